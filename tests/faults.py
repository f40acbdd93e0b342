"Fault injection for the tests: poison a gradient, interrupt a run at a step."
import signal
import subprocess
import time
from pathlib import Path


def poison_gradients(params, steps: set[int]):
    "Make the gradient of `params[0]` NaN during the optimizer steps numbered in `steps` (1-based, one micro-batch each)."
    calls = {"n": 0}
    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in steps else grad
    return params[0].register_hook(hook)


def interrupt_at_checkpoint(cmd: list[str], output_dir: Path, checkpoint: str, sig=signal.SIGINT, timeout=300):
    "Start `cmd`, send `sig` once `output_dir/checkpoint` exists, and return the finished process's (code, stderr)."
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (output_dir / checkpoint).exists():
        if proc.poll() is not None or time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{checkpoint} never appeared:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err
