"""``nirdml index``: build a faiss index of a gallery (``build``) or describe one (``info``)."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import (
    add_batch_size_option,
    add_data_root_option,
    add_device_option,
    add_num_workers_option,
    positive_int,
)

HELP = "build a searchable gallery index from a checkpoint (index build), or describe one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    from nirdml.cli import HelpFormatter as fmt
    b = sub.add_parser("build", help="embed a gallery and index it", formatter_class=fmt,
                       description="Embed a gallery with a checkpoint and write INDEX_DIR "
                                   "(index.faiss, meta.json, labels.npy).")
    b.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. best.pt)")
    b.add_argument("--gallery", required=True,
                   help="split:train|val|test of the checkpoint's dataset, a folder of class "
                        "folders (FOLDER/<class>/**/<image>: the class is the first level; "
                        "hidden names skipped), or an embeddings .npz "
                        "(embeddings, labels, optional paths)")
    b.add_argument("--out", required=True,
                   help="the index directory to write: a new or empty folder, or an index "
                        "nirdml wrote before (replaced); any other folder is refused")
    b.add_argument("--type", default="flat", choices=["flat", "ivf", "ivfpq"],
                   help="flat: exact; ivf / ivfpq: approximate, for millions of items")
    b.add_argument("--nlist", type=positive_int, default=None,
                   help="IVF cells (default ~4*sqrt(N))")
    b.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF cells visited per query (default 16)")
    b.add_argument("--m", type=positive_int, default=None,
                   help="IVF-PQ sub-quantisers, must divide the embedding dim (default dim/4)")
    b.add_argument("--nbits", type=positive_int, default=None,
                   help="IVF-PQ bits per sub-quantiser (default 8)")
    add_device_option(b, "for embedding the gallery")
    add_batch_size_option(b)
    add_num_workers_option(b)
    add_data_root_option(b)
    b.add_argument("--match-fmr", type=float, default=None, metavar="F",
                   help="calibrate the 'same item?' decision: the cosine threshold with false-"
                        "match rate F (e.g. 1e-3) on --match-on, stored with the index")
    b.add_argument("--match-on", default="split:val", metavar="GALLERY",
                   help="labelled images of other classes than the gallery's to calibrate on "
                        "(as --gallery takes them; default: split:val, the held-out classes)")
    b.add_argument("--on-error", choices=["skip", "fail"], default=None,
                   help="undecodable gallery images: skip them or stop (default: the "
                        "checkpoint's data.on_error)")
    i = sub.add_parser("info", help="describe an index directory", formatter_class=fmt)
    i.add_argument("--index", required=True, help="an index directory")


def run(args: argparse.Namespace) -> int:
    from nirdml.retrieval import IndexSpec, Retriever
    from nirdml.retrieval.index import check_index_folder

    if args.action == "info":
        r = Retriever.load(args.index, load_model=False)
        print(f"{args.index}: {len(r)} items x {r.dim} dims, {r.spec.to_dict()}")
        print(f"checkpoint: {r.checkpoint}\nfingerprint: {r.fingerprint}\ngallery: {r.source}")
        m = r.index.match
        print("match decision: " + ("none (index build --match-fmr F)" if m is None else
              f"cosine > {m['threshold']:.4f}: FMR {m['fmr']:.2g} (target {m['target_fmr']:g}), "
              f"FNMR {m['fnmr']:.3f} on {m.get('on')}"))
        return 0
    from nirdml.devices import resolve_device

    resolve_device(args.device, "--device")
    spec = IndexSpec(args.type, nlist=args.nlist, nprobe=args.nprobe, m=args.m, nbits=args.nbits)
    check_index_folder(args.out, option="--out")  # refused before minutes of embedding
    if args.match_fmr is not None:
        from nirdml.evaluation.verification import check_rates
        from nirdml.retrieval.gallery import parse_gallery

        check_rates([args.match_fmr])
        parse_gallery(args.match_on)
    r = Retriever.from_checkpoint(args.checkpoint, args.gallery, spec, device=args.device,
                                  batch_size=args.batch_size, num_workers=args.num_workers,
                                  data_root=args.data_root, on_error=args.on_error)
    if args.match_fmr is not None:
        from nirdml.retrieval.gallery import embed_gallery

        held_out = embed_gallery(r.run, args.match_on, args.on_error or
                                 r.run.config.data.on_error, args.batch_size, args.num_workers)
        m = r.index.calibrate(held_out.embeddings, held_out.labels, args.match_fmr,
                              on=args.match_on)
        print(f"match decision: cosine > {m['threshold']:.4f} (FMR {m['fmr']:.2g}, FNMR "
              f"{m['fnmr']:.3f} on {args.match_on}, {m['impostor_pairs']} impostor pairs)")
    r.save(args.out, option="--out")
    skipped = r.source.get("skipped") or []
    print(f"indexed {len(r)} gallery items ({r.dim}-d, {r.spec.type}) into {args.out}"
          + (f"; skipped {len(skipped)} undecodable images" if skipped else ""))
    return 0
