"""Edit one image over HTTP with a running `longcat-ray serve` (the demo's last step; also a client example).

    python scripts/http_edit.py --url http://127.0.0.1:8000 --image in.png --prompt "..." --lora output --output out.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import requests


def wait_until_healthy(url: str, seconds: float) -> None:
    deadline, last = time.monotonic() + seconds, "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=5)
            if response.ok:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except requests.RequestException as err:  # not listening yet, or still deploying
            last = str(err)[:200]
        time.sleep(1)
    sys.exit(f"{url}/healthz not healthy after {seconds:.0f} s: {last}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", required=True, help="the edited image; its suffix picks the format the server "
                        "encodes: .jpg/.jpeg JPEG, .webp WebP, anything else PNG")
    parser.add_argument("--lora", default="", help="adapter id (GET /v1/loras)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the server picks from the source's aspect)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for /healthz first")
    args = parser.parse_args()
    if args.wait:
        wait_until_healthy(args.url, args.wait)
    data = {"prompt": args.prompt, "lora": args.lora, "seed": str(args.seed)}
    if args.steps:
        data["num_inference_steps"] = str(args.steps)
    if args.size:
        data["width"], data["height"] = args.size.lower().split("x")
    suffix = os.path.splitext(args.output)[1].lower()
    data["output_format"] = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(suffix, "png")
    token = os.environ.get("LONGCAT_RAY_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with open(args.image, "rb") as image:
        response = requests.post(f"{args.url}/v1/edit", files={"image": image}, data=data, headers=headers, timeout=600)
    if not response.ok:
        sys.exit(f"POST /v1/edit: {response.status_code} {response.text}")
    with open(args.output, "wb") as out:
        out.write(response.content)
    print(f"wrote {args.output} (lora {args.lora or 'none'}, seed {response.headers['X-Seed']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
