"""The FFN arm of the lora-vs-ffn comparison, on the very text the LoRA arm trained on (its
generated windows, copied from its work folder, seed 42): the run is started as a --resume of
a work folder holding only that text and the settings, so nothing is regenerated."""
import json
import shutil
import sys
import time
from pathlib import Path

from prunenet.finetune import finetune

lr = float(sys.argv[1])
out = Path(f"/tmp/dbench/cmp-ffn-{lr:g}")
work = Path(f"{out}.work")
work.mkdir()
shutil.copy("/tmp/dbench/generated-40x256.pt", work / "generated-windows.pt")
settings = json.loads(Path("/tmp/dbench/lora-settings.json").read_text())
settings.update(train="ffn", lr=lr)
(work / "prunenet-finetune.json").write_text(json.dumps(settings))
started = time.perf_counter()
result = finetune("/tmp/dbench/smol-r30", "self-generated", out, steps=40, seqlen=256,
                  eval_windows=4, eval_every=10, patience=None, train="ffn", lr=lr,
                  progress=False, resume=True)
entry = result.record["finetune"]
print(json.dumps({"train": "ffn", "lr": lr, "wall_s": round(time.perf_counter() - started, 1),
                  "train_seconds": entry["train_seconds"], "kl_before": entry["eval_kl_before"],
                  "kl_after": entry["eval_kl_after"], "ppl_before": entry["eval_perplexity_before"],
                  "ppl_after": entry["eval_perplexity_after"], "history": entry["eval_history"]}),
      flush=True)
