"""A TCP forwarder on loopback in front of a test S3 server, which a test can cut (every connection closed, new ones
refused) and restore on the same port: the storage going away mid-upload and coming back, its data kept."""
import socket
import threading


class CuttableProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None
        self.puts, self.cut_at = 0, None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self.accept, args=(listener,), daemon=True).start()

    def accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self.pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client), daemon=True).start()

    def cut_at_put(self, number: int) -> None:
        """Cut everything as the `number`-th PUT request (counted from now) arrives: it never reaches S3."""
        self.puts, self.cut_at = 0, number

    def cuts_here(self, data: bytes) -> bool:
        if not (self.cut_at and data.startswith(b"PUT ")):
            return False
        self.puts += 1
        if self.puts < self.cut_at:
            return False
        self.cut_at = None
        self.cut()
        return True

    def pipe(self, source, sink, to_s3: bool = False) -> None:
        try:
            while data := source.recv(65536):
                if to_s3 and self.cuts_here(data):
                    return
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
