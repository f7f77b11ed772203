"""longcat-ray: fine-tune LongCat-Image-Edit with LoRA on Ray (Data, Train + DeepSpeed) and serve it (Serve)."""

import logging
import os
import warnings


PREEMPTION_WATCHER_LINE = r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"


def _quiet_known_noise() -> None:
    """Third-party warnings that say nothing about the user's data or config, silenced at their exact loggers in
    every process that imports the package (Ray workers too). LONGCAT_RAY_VERBOSE=1 keeps them.
    - torch.utils._pytree: torchao 0.18 registers its enums the deprecated way when it is imported
      ("... is an Enum subclass ... Calling register_constant() on Enum subclasses is deprecated").
    - diffusers' torchao quantizer: "Unable to import `torchao` Tensor objects" (diffusers 0.42 looks for classes
      torchao 0.18 moved; only checkpoints serialized by torchao would need them, and none is loaded here).
    - torch.distributed: "`torch.distributed.all_gather_into_tensor` is deprecated" (a FutureWarning DeepSpeed 0.19's
      ZeRO-1/2 step triggers on every training worker; the call is DeepSpeed's, not ours).
    - DeepSpeed's "Setting accelerator to CPU" (every CPU process that imports it: the CPU is what we asked for) and
      "ZeRO with an untested optimizer" (we hand it torch's AdamW on purpose: DESIGN.md §4); its other warnings show.
    - Ray's "Token authentication is enabled for this Ray cluster" when it starts a local Ray with a token.
    - Ray Data's "Progress bars disabled" (the CLI turns them off for its own progress output), and its executor's
      INFO lines on the console (each dataset's start, plan and end: ray-data.log under the session keeps them).
    - Ray's core worker's error line for Ray Train's own PreemptionWatcher actor ("has constructor arguments in the
      object store and max_restarts > 0", ray-project/ray#53727): every run's controller logs it, and nothing in it is
      the user's to act on. It reaches the console through the driver's log deduplicator, which drops lines matching
      RAY_DEDUP_LOGS_SKIP_REGEX (read when ray is imported: the package is imported first by the CLI and the jobs/
      scripts). The same line for Ray Data's cache encoders is written by the driver's own core worker, which no
      filter here reaches.
    Progress bars stay: downloading and loading real weights takes minutes."""
    if verbose():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", PREEMPTION_WATCHER_LINE)
    for name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    drop_messages("DeepSpeed", ("Setting accelerator to CPU", "**** You are using ZeRO with an untested optimizer"))
    drop_messages("ray.data._internal.progress", ("Progress bars disabled",))
    # a local Ray that turned token auth on by itself says so (the "disabled" warning, a risk, still shows)
    drop_messages("ray._private.authentication.authentication_token_setup", ("Token authentication is enabled",))
    hide_info_on_console("ray.data._internal.execution.streaming_executor")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def verbose() -> bool:
    """LONGCAT_RAY_VERBOSE=1: every third-party line shows (Ray's INFO logs, known warnings)."""
    return bool(os.environ.get("LONGCAT_RAY_VERBOSE"))


def hide_info_on_console(logger: str) -> None:
    """INFO records of `logger` are marked for Ray Data's console filter to drop (`hide`); its log file keeps them."""

    def mark(record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            record.hide = True
        return True

    logging.getLogger(logger).addFilter(mark)


def drop_messages(logger: str, starts: tuple[str, ...]) -> None:
    """Records of `logger` whose message starts with one of `starts` are dropped; the logger's others pass."""
    logging.getLogger(logger).addFilter(lambda record: not str(record.msg).startswith(starts))


_quiet_known_noise()
