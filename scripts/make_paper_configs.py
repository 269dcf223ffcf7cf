"""Write the paper's runs as config files into src/nirdml/configs/ (re-run after recipe changes).

Recipe (``docs/method.md``, the released defaults): ResNet50 ImageNet-pretrained, frozen BN,
average pooling, Adam lr 1e-5 (weight decay 4e-4), batch 90 = 45 classes x 2, flow lr x50 (x1 on
SOP), NIR weight 0.0075 / 0.01 / 0.3 (CUB / Cars / SOP, release mode), 100 epochs (SOP 300 with
lr steps at 140 and 230, gamma 0.2). Row for row as the release:

* ``<ds>_pa_<dim>``: the ProxyAnchor baseline: proxies x2000, no warm-up.
* ``<ds>_pa_nir_<dim>``: ProxyAnchor + NIR: proxies x4000, warm-up 1 epoch (SOP 5) with the
  backbone frozen.
* ``<ds>_pa[_nir]_<dim>_doublepool``: the release's separate "DoublePool" rows (average + max
  pooling).
* ``<ds>_{pnca,st}[_nir]_<dim>``: the release ships no recipe for these (its NIR is hard-wired
  to ProxyAnchor); they follow the ProxyAnchor + NIR protocol (x4000, warm-up), with and without
  NIR, so that their NIR gain is measured under one protocol.
* ``<ds>_pa_control_<dim>`` (ours, not in the release): the ProxyAnchor baseline with exactly
  the NIR run's protocol (x4000, warm-up) and no flow: a gain counts for NIR only against it.

Model selection on validation classes held out of the training classes (the clean protocol);
the release's best-epoch-on-test is ``--set data.val_fraction=0 --set train.select_on=test``.
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


def config(dataset: str, loss: str, dim: int, nir: bool, pooling: str = "avg",
           release_baseline: bool = False) -> dict:
    """One run; ``release_baseline``: the release's ProxyAnchor baseline protocol (x2000, no
    warm-up) instead of the NIR protocol (x4000, warm-up)."""
    d = DATASETS[dataset]
    return {
        "seed": 0,
        "data": {"name": dataset, "root": None, "val_fraction": 0.1, "batch_size": 90,
                 "samples_per_class": 2, "num_workers": 8, "eval_batch_size": 256},
        "model": {"name": "resnet50", "embedding_dim": dim, "pretrained": True,
                  "pooling": pooling},
        "loss": {"name": loss, "proxy_lr_multiplier": 2000.0 if release_baseline else 4000.0,
                 "nir": {"enabled": nir, "weight": d["nir_weight"], "mode": "release",
                         "flow_lr_multiplier": d["flow_mult"]}},
        "optim": {"name": "adam", "lr": 1.0e-5, "weight_decay": 4.0e-4,
                  "scheduler": "multistep" if d["milestones"] else "none",
                  "milestones": d["milestones"], "gamma": 0.2,
                  "warmup_epochs": 0 if release_baseline else d["warmup"]},
        "train": {"epochs": d["epochs"], "device": "auto", "amp": "bf16", "select_on": "val",
                  "selection_metric": "recall@1"},
        "eval": {"recall_ks": d["ks"],
                 "metrics": ["recall", "map@r", "r_precision", "map@1000", "nmi"]},
    }


def runs() -> dict[str, tuple[str, dict]]:
    """Config name -> (header, config) of every paper run."""
    out = {}
    for dataset in DATASETS:
        for dim in (128, 512):
            for loss, short in LOSSES.items():
                for nir in (False, True):
                    name = f"{dataset}_{short}{'_nir' if nir else ''}_{dim}"
                    base = loss == "proxy_anchor" and not nir
                    what = (f"{loss}{' + NIR' if nir else ''}, ResNet50, {dim}-d, average "
                            f"pooling")
                    note = ("the release's ProxyAnchor baseline protocol (proxies x2000, no "
                            "warm-up)" if base else "the release's NIR protocol (proxies x4000, "
                            f"warm-up {DATASETS[dataset]['warmup']})")
                    out[name] = (f"{dataset}, {what}; {note}",
                                 config(dataset, loss, dim, nir, release_baseline=base))
                    if loss == "proxy_anchor":
                        out[f"{name}_doublepool"] = (
                            f"{dataset}, {loss}{' + NIR' if nir else ''}, ResNet50, {dim}-d, the "
                            f"release's DoublePool rows (average + max pooling); {note}",
                            config(dataset, loss, dim, nir, "double", release_baseline=base))
            out[f"{dataset}_pa_control_{dim}"] = (
                f"{dataset}, proxy_anchor, ResNet50, {dim}-d, average pooling. OURS, not a "
                f"release row: the baseline with exactly the NIR run's protocol (proxies x4000, "
                f"warm-up {DATASETS[dataset]['warmup']}) and no flow, the control for NIR's gain",
                config(dataset, "proxy_anchor", dim, False))
    return out


def main() -> None:
    for old in OUT.glob("*.yaml"):
        if old.stem.split("_")[0] in DATASETS:
            old.unlink()
    for name, (what, cfg) in runs().items():
        header = f"# Paper run: {what}\n# (written by scripts/make_paper_configs.py)\n"
        (OUT / f"{name}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
