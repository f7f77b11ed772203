"""Output a user reads: the third-party warnings that say nothing about their data or config stay out of it,
and LONGCAT_RAY_VERBOSE=1 brings them back."""

import os
import subprocess
import sys

# what the training worker and the pipeline loader import (torchao through diffusers' quantizers)
IMPORTS = ("import longcat_ray.training, diffusers.quantizers.torchao.torchao_quantizer\n"
           # DeepSpeed's ZeRO step gathers with this call on every training worker
           "import torch, torch.distributed as dist\n"
           "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
           "dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(2))\n"
           "dist.destroy_process_group()\n"
           # what DeepSpeed logs in a CPU training worker, on its own logger (importing DeepSpeed here costs ~25 s)
           "import logging\n"
           "logging.getLogger('DeepSpeed').warning('Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.')\n"
           "logging.getLogger('DeepSpeed').warning('**** You are using ZeRO with an untested optimizer, proceed with caution *****')")
NOISE = ("register_constant() on Enum subclasses is deprecated", "Unable to import `torchao` Tensor objects",
         "`torch.distributed.all_gather_into_tensor` is deprecated", "Setting accelerator to CPU",
         "You are using ZeRO with an untested optimizer")


def imported(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LONGCAT_RAY_VERBOSE"}
    if verbose:
        env["LONGCAT_RAY_VERBOSE"] = "1"
    done = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_known_third_party_noise_is_silenced_and_verbose_keeps_it():
    quiet, verbose = imported(verbose=False), imported(verbose=True)  # one process each
    assert not [n for n in NOISE if n in quiet]
    assert all(n in verbose for n in NOISE)  # the filter is what silences them, not luck
