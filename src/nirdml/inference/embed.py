"""``embed_dataset``: a model's embeddings of every sample of a dataset, in order.

The one loop that turns a dataset into :class:`~nirdml.embeddings.Embeddings`: a trained run
(:meth:`nirdml.inference.TrainedRun.embed`), the trainer's validation and test evaluation and the
feature cache of a frozen backbone (``nirdml.data.features``) all call it. It needs only torch
and the shared leaf modules, so those lower layers can use it.
"""

from __future__ import annotations

import numpy as np

from nirdml.embeddings import Embeddings


def embed_dataset(model, dataset, device, batch_size: int = 256, num_workers: int = 0,
                  amp: str = "none", progress: str | None = None,
                  generator=None) -> Embeddings:
    """Embed every sample of ``dataset`` in order (eval mode, no gradients); ``progress``
    names a progress bar shown on a terminal. The loader draws its workers' base seed from
    ``generator``, or from the global torch RNG when None (as the trainer's evaluation always
    has: changing that would change every run's trajectory)."""
    import torch

    from nirdml.devices import autocast

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, generator=generator,
                                         pin_memory=torch.device(device).type == "cuda")
    was_training = model.training
    model.eval()
    chunks = []
    bar = None
    if progress:
        from nirdml.console import progress_bar

        bar = progress_bar(len(dataset), f"{progress}: embedding", "img")
    try:
        with torch.no_grad():
            for images, _ in loader:
                with autocast(torch.device(device), amp):
                    chunks.append(model(images.to(device, non_blocking=True)).float().cpu())
                if bar is not None:
                    bar.update(len(images))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    emb = torch.cat(chunks).numpy() if chunks else np.zeros((0, 1), np.float32)
    return Embeddings(emb, np.asarray(dataset.labels), getattr(dataset, "is_query", None),
                      getattr(dataset, "is_gallery", None))


__all__ = ["embed_dataset"]
