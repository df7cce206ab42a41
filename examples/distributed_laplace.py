"""A Laplace posterior fitted and evaluated data parallel, under accelerate or torchrun.

Launch two processes (gloo on CPUs; on GPUs, one per device, NCCL):

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_laplace.py
    torchrun --nproc_per_node 2 examples/distributed_laplace.py

(``--multi_gpu`` selects accelerate's torchrun-based launcher; without GPUs the script's
``Accelerator(cpu=True)`` runs over gloo. Add ``PYTHONPATH=src`` from a checkout.)

1. Train a small classifier with DDP (``accelerator.prepare``), then take the module out of the
   DDP wrapper (``accelerator.unwrap_model``, i.e. ``.module``): forward-mode AD through DDP or
   FSDP is not supported upstream (PyTorch issues 182641, 182661), so the library runs on the
   replicated module, each rank on its shard of the data.
2. Fit K-FAC on the training set: every rank passes over its shard (a ``DataLoader`` with a
   ``DistributedSampler``, *not* prepared by accelerate, whose padding of the last batches
   cannot be told apart from real examples) and the factors are all-reduced; the prior
   precision is tuned by the marginal likelihood, identically on every rank.
3. Gather the probit predictive over a sharded test set on every rank, in dataset order
   (``pushforward.distributed.evaluate``), and print the test accuracy and NLL on rank 0 —
   next to what one process computes on all the data, to show they agree.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pushforward as pf
from pushforward.curvature import GGN, laplace_posterior, optimize_prior_precision
from pushforward.distributed import evaluate


def make_data(n: int, seed: int) -> TensorDataset:
    """Three classes in the plane (the same on every rank: the sampler shards it)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 0] > 1).long()
    return TensorDataset(X, y)


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    train, test = make_data(2000, 1), make_data(1001, 2)  # 1,001: an uneven last shard

    # 1. train with DDP
    model = nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_loader = DataLoader(train, batch_size=100, shuffle=True)
    ddp_model, optimizer, prepared = accelerator.prepare(model, optimizer, train_loader)
    for _ in range(5):
        for xb, yb in prepared:
            optimizer.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(ddp_model(xb), yb))
            optimizer.step()
    model = accelerator.unwrap_model(ddp_model).eval()  # the replicated module (.module)

    # 2. K-FAC over the sharded training set, all-reduced; the prior by the marginal likelihood
    def sharded(dataset: TensorDataset) -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=256, sampler=sampler)

    ggn = GGN(model, sharded(train))
    H = ggn.kfac()
    delta = optimize_prior_precision(ggn, H, prior_structure="layerwise")
    S = laplace_posterior(H, delta)

    # 3. the predictive over the sharded test set, gathered in dataset order on every rank
    probs = evaluate(model, sharded(test), S, "predictive", link="probit")
    X_test, y_test = test.tensors
    X_test, y_test = X_test.to(accelerator.device), y_test.to(accelerator.device)
    accuracy = (probs.argmax(-1) == y_test).double().mean()
    nll = -probs.gather(1, y_test[:, None]).log().mean()
    n_train = ggn.n_data  # on every rank: the count is all-reduced (cached after the marglik)
    if accelerator.is_main_process:
        print(f"{world} processes: N_train={n_train}, prior precision per tensor {delta.tolist()}")
        print(f"test: {len(probs)} examples, accuracy {accuracy:.4f}, NLL {nll:.4f}")
        # one process on all the data (process_group=None) gives the same curvature
        alone = GGN(model, DataLoader(train, batch_size=500), process_group=None).kfac()
        difference = (alone.to_dense() - H.to_dense()).abs().max() / H.to_dense().abs().max()
        single = pf.predictive(model, X_test, S, link="probit")
        print(f"K-FAC vs one process: max relative difference {difference:.2e}")
        print(f"predictive vs one process: max difference {(single - probs).abs().max():.2e}")


if __name__ == "__main__":
    main()
