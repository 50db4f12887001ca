"""Launch a small sweep, read results back, and show what the index knows."""

from machinable import Index, get

for lr in (0.01, 0.1, 0.5):
    run = get("optimize", {"lr": lr})
    run.launch()  # computes once; run this script again and nothing is recomputed
    print(f"lr={lr:<5} loss={run.loss():.4f} uuid={run.uuid} cached={run.cached()}")

runs = get("optimize").all()
print(f"{len(runs)} run(s) of 'optimize' in {Index.get().path}")
print("results live in", get("optimize", {"lr": 0.5}).local_directory())
