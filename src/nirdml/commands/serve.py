"""``nirdml serve``: an index and its model behind HTTP, with a search page (``nirdml[serve]``)."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import add_device_option, int_in_range, positive_float, positive_int

HELP = "serve an index over HTTP: a search API and a page (pip install 'nirdml[serve]')"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="an index directory (nirdml index build)")
    parser.add_argument("--checkpoint", default=None,
                        help="the model to embed queries with (default: the index's own)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=8000, help="TCP port")
    parser.add_argument("--writable", action="store_true",
                        help="allow POST /items and DELETE /items/ID (each change is committed "
                             "to the index folder before the reply)")
    parser.add_argument("--rerank", default=None, metavar="NAME[:K=V,...]",
                        help="default re-ranking of every search: alpha_qe or dba (a request "
                             "may pass ?rerank=...; default: none)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=8.0,
                        help="largest request body accepted (default 8 MB)")
    parser.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                        help="largest decoded image, in pixels (default 40 million)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="most concurrent image queries embedded in one forward pass "
                             "(1: one at a time)")
    parser.add_argument("--batch-wait-ms", type=positive_float, default=20.0,
                        help="under load, how long the first query of a batch waits for "
                             "others (ms; a query at low load never waits)")
    add_device_option(parser, "for embedding the queries")


def run(args: argparse.Namespace) -> int:
    from nirdml.devices import resolve_device
    from nirdml.errors import ConfigError
    from nirdml.evaluation.rerank import parse_served

    resolve_device(args.device, "--device")
    parse_served(args.rerank)
    try:
        import uvicorn

        from nirdml.serve.app import SearchService, create_app
    except ImportError as exc:
        raise ConfigError(f"nirdml serve needs the serve extra ({exc.name} is missing): "
                          f"pip install 'nirdml[serve]'") from None
    from nirdml.retrieval import Retriever

    if args.writable:
        from nirdml.retrieval.index import check_index_folder

        check_index_folder(args.index, "--index")  # only an index folder nirdml wrote
    retriever = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    service = SearchService(retriever, args.index, writable=args.writable, rerank=args.rerank,
                            max_upload_bytes=int(args.max_upload_mb * 2**20),
                            max_pixels=args.max_pixels, max_batch=args.batch_size,
                            batch_wait_s=args.batch_wait_ms / 1000)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can "
              f"search{' and change' if args.writable else ''} the index (no authentication)")
    print(f"serving {args.index} ({retriever.index.num_live} items) on "
          f"http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=2)
    return 0
