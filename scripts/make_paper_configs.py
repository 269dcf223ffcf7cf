"""Write the paper's runs as config files into src/nirdml/configs/ (re-run after recipe changes).

Recipe (``docs/method.md``, the released defaults): ResNet50 ImageNet-pretrained, frozen BN,
double pooling, Adam lr 1e-5 (weight decay 4e-4), batch 90 = 45 classes x 2, proxies lr x4000
with NIR (x2000 for the ProxyAnchor baseline), flow lr x50 (x1 on SOP), NIR weight 0.0075 / 0.01
/ 0.3 (CUB / Cars / SOP, release mode), 100 epochs (SOP 300 with lr steps at 140 and 230,
gamma 0.2), warm-up 1 epoch (SOP 5) with the backbone frozen. Model selection on validation
classes held out of the training classes (the clean protocol); the release's best-epoch-on-test
is ``--set data.val_fraction=0 --set train.select_on=test``.
"""

from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "nirdml" / "configs"

DATASETS = {
    "cub200": {"nir_weight": 0.0075, "flow_mult": 50.0, "epochs": 100, "warmup": 1,
               "milestones": [], "ks": [1, 2, 4, 8]},
    "cars196": {"nir_weight": 0.01, "flow_mult": 50.0, "epochs": 100, "warmup": 1,
                "milestones": [], "ks": [1, 2, 4, 8]},
    "sop": {"nir_weight": 0.3, "flow_mult": 1.0, "epochs": 300, "warmup": 5,
            "milestones": [140, 230], "ks": [1, 10, 100, 1000]},
}
LOSSES = {"proxy_anchor": "pa", "proxy_nca": "pnca", "soft_triple": "st"}


def config(dataset: str, loss: str, dim: int, nir: bool) -> dict:
    d = DATASETS[dataset]
    proxy_mult = 4000.0 if nir or loss != "proxy_anchor" else 2000.0
    return {
        "seed": 0,
        "data": {"name": dataset, "root": None, "val_fraction": 0.1, "batch_size": 90,
                 "samples_per_class": 2, "num_workers": 8, "eval_batch_size": 256},
        "model": {"name": "resnet50", "embedding_dim": dim, "pretrained": True,
                  "pooling": "double"},
        "loss": {"name": loss, "proxy_lr_multiplier": proxy_mult,
                 "nir": {"enabled": nir, "weight": d["nir_weight"], "mode": "release",
                         "flow_lr_multiplier": d["flow_mult"]}},
        "optim": {"name": "adam", "lr": 1.0e-5, "weight_decay": 4.0e-4,
                  "scheduler": "multistep" if d["milestones"] else "none",
                  "milestones": d["milestones"], "gamma": 0.2, "warmup_epochs": d["warmup"]},
        "train": {"epochs": d["epochs"], "device": "auto", "amp": "bf16", "select_on": "val",
                  "selection_metric": "recall@1"},
        "eval": {"recall_ks": d["ks"],
                 "metrics": ["recall", "map@r", "r_precision", "map@1000", "nmi"]},
    }


def main() -> None:
    for dataset in DATASETS:
        for loss, short in LOSSES.items():
            for dim in (128, 512):
                for nir in (False, True):
                    name = f"{dataset}_{short}{'_nir' if nir else ''}_{dim}"
                    header = (f"# Paper run: {dataset}, {loss}{' + NIR' if nir else ''}, "
                              f"ResNet50, {dim}-d (written by scripts/make_paper_configs.py)\n")
                    text = yaml.safe_dump(config(dataset, loss, dim, nir), sort_keys=False)
                    (OUT / f"{name}.yaml").write_text(header + text)


if __name__ == "__main__":
    main()
