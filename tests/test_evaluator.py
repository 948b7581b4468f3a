"""The evaluator (conv2former/engine/evaluator.py): top-1/top-5 and per-class counts, padding (label -1) never
counted, with no data-dependent indexing (which would wait for the device every batch)."""

import torch

from conv2former.engine.evaluator import Evaluator


class Logits(torch.nn.Module):
    """Returns its input as the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_counts_equal_a_direct_count_and_padding_is_ignored():
    gen = torch.Generator().manual_seed(0)
    classes = 7
    batches = []
    for size, pad in ((6, 0), (6, 2), (5, 5)):
        logits = torch.randn(size, classes, generator=gen)
        labels = torch.randint(0, classes, (size,), generator=gen)
        labels[size - pad :] = -1
        batches.append((logits, labels))
    result = Evaluator(classes, torch.device("cpu")).run(Logits(), batches)
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    real = labels >= 0
    top5 = logits[real].topk(5, dim=1).indices
    expected_top1 = (top5[:, 0] == labels[real]).double().mean().item()
    expected_top5 = (top5 == labels[real].view(-1, 1)).any(1).double().mean().item()
    assert result.num_samples == int(real.sum()) == 10
    assert result.top1 == expected_top1 and result.top5 == expected_top5
    per_class_samples = torch.bincount(labels[real], minlength=classes).double()
    assert torch.equal(result.per_class[:, 2], per_class_samples)  # padding added nothing to class 0
