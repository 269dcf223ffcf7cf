"""``python -m nirdml`` (and ``torchrun -m nirdml``) entry point."""

from nirdml.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
