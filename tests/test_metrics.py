"""Metric definitions on hand-computed logits."""

import torch

from mmke.scoring import agreement, exact_match, token_accuracy, topk_agreement
from mmke.models.base import TargetView, target_nll, target_view


def onehot_logits(ids, V=6):
    x = torch.full((len(ids), len(ids[0]), V), -5.0)
    for b, row in enumerate(ids):
        for t, i in enumerate(row):
            x[b, t, i] = 5.0
    return x


def test_target_view_aligns_shifted_logits_with_target_tokens():
    # sequence of 5 positions: 3 prompt positions then a 2-token target [4, 1]
    labels = torch.tensor([[-100, -100, -100, 4, 1]])
    logits = torch.zeros(1, 5, 6)
    logits[0, 2, 4] = 9.0  # position 2 predicts token at position 3
    logits[0, 3, 1] = 9.0  # position 3 predicts token at position 4
    logits[0, 4, 0] = 9.0  # the last position predicts nothing scored
    v = target_view(logits, labels)
    assert v.target_ids.tolist() == [[4, 1]]
    assert v.mask.tolist() == [[True, True]]
    assert v.logits.argmax(-1).tolist() == [[4, 1]]
    assert token_accuracy(v).tolist() == [1.0]


def test_token_accuracy_and_exact_match_by_hand():
    # case 0: target [2, 0], predicted [2, 1] -> 1/2 tokens, not exact
    # case 1: target [3] (one token, padded), predicted [3] -> 1.0, exact
    logits = onehot_logits([[2, 1], [3, 5]])
    ids = torch.tensor([[2, 0], [3, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    v = TargetView(logits, ids, mask)
    assert token_accuracy(v).tolist() == [0.5, 1.0]
    assert exact_match(v).tolist() == [0.0, 1.0]


def test_locality_top1_agreement_by_hand():
    pre = torch.tensor([[1, 2, 3], [4, 4, 0]])
    post = torch.tensor([[1, 0, 3], [4, 4, 9]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    frac, exact = agreement(pre, post, mask)
    assert torch.allclose(frac, torch.tensor([2 / 3, 1.0]))
    assert exact.tolist() == [0.0, 1.0]


def test_reference_topk_rank_by_rank_agreement():
    pre = torch.tensor([[[1, 2], [3, 4]]])
    post = torch.tensor([[[1, 3], [3, 4]]])  # position 0: rank 2 differs; position 1: same
    frac, exact = topk_agreement(pre, post, torch.tensor([[True, True]]))
    assert frac.item() == 0.75 and exact.item() == 0.0
    swapped = torch.tensor([[[2, 1], [3, 4]]])  # same set, different order: counts as disagreement
    frac, _ = topk_agreement(pre, swapped, torch.tensor([[True, True]]))
    assert frac.item() == 0.5


def test_target_nll_matches_cross_entropy():
    logits = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[True, True, True], [True, False, False]])
    nll = target_nll(TargetView(logits, ids, mask))
    ref = torch.nn.functional.cross_entropy(logits[mask], ids[mask])
    assert torch.allclose(nll, ref)
