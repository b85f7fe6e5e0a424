"""Calibration memory stays flat in depth: GPTQ on a 2-layer and a 10-layer random model needs the same
extra memory on top of the model (one block's statistics and the current hidden states)."""
import json
import subprocess
import sys

SCRIPT = r"""
import json, os, sys, threading, torch
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModelForCausalLM
from quantarena.calibration.data import random_windows
from quantarena.quantize import quantize

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=int(sys.argv[1]),
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).eval()
windows = random_windows(256, 512, 8, seed=0)
start = peak = rss()
done = threading.Event()
def sample():
    global peak
    while not done.wait(0.005):
        peak = max(peak, rss())
t = threading.Thread(target=sample); t.start()
quantize(model, "w4a16-gptq", windows, progress=False)
done.set(); t.join()
print(json.dumps({"extra_mb": (max(peak, rss()) - start) / 2**20}))
"""


def extra_mb(layers: int) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(layers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def test_calibration_memory_flat_in_depth():
    shallow, deep = extra_mb(2), extra_mb(10)
    # keeping each block's outputs would add 8 windows x 512 x 256 x 4 B = 4 MB per block (32 MB here)
    assert deep < shallow + 12, (shallow, deep)
