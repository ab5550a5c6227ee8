"""Render Resources/Screenshots/MRISynthesis.png, the figure the extension metadata names:
one axial slice of T1, T2, the synthetic FLAIR of the shipped T1 + T2 model and the real FLAIR
of a subject the model never saw in training.

    python scripts/render_screenshot.py DATA_DIR [--subject ms-mni-07] [--out Resources/Screenshots/MRISynthesis.png]

Default subject: ms-mni-07 of the Ljubljana 3D MS database (Lesjak et al. 2017, CC BY),
a held-out test subject of t1_t2_to_flair.
"""

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--subject", default="ms-mni-07")
    parser.add_argument("--out", default=str(REPO / "Resources" / "Screenshots" / "MRISynthesis.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from MRISynthesisLib.inference import synthesize
    from MRISynthesisLib.models import resolve_model
    from MRISynthesisLib.volumes import load_volume

    folder = Path(args.data) / args.subject
    volumes = {m: load_volume(folder / f"{m}.nii.gz") for m in ("t1", "t2", "flair")}
    synthetic = synthesize({"t1": volumes["t1"], "t2": volumes["t2"]}, resolve_model("t1_t2_to_flair", []),
                           device="cpu", precision="fp32")
    brain = volumes["t1"].array > 0
    k = int(np.argmax(brain.sum(axis=(0, 1))))  # the axial slice with the most brain
    panels = [("T1 (input)", volumes["t1"].array), ("T2 (input)", volumes["t2"].array),
              ("synthetic FLAIR", synthetic.array), ("real FLAIR", volumes["flair"].array)]
    figure, axes = plt.subplots(1, 4, figsize=(12, 3.6), facecolor="black")
    for axis, (title, array) in zip(axes, panels):
        image = np.rot90(array[:, :, k])  # RAS volume: anterior up, patient's right on the left
        axis.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(array[brain], 99.5))
        axis.set_title(title, color="white", fontsize=13)
        axis.axis("off")
    figure.suptitle(f"MRISynthesis: T1 + T2 \u2192 FLAIR (shipped paper model) on a held-out subject "
                    f"({args.subject}, Ljubljana 3D MS database, CC BY)", color="white", fontsize=11, y=0.04)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100, facecolor="black")
    print(args.out)


if __name__ == "__main__":
    main()
