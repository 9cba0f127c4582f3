"""KE: the Knowledge Editor (De Cao, Aziz and Titov, "Editing Factual Knowledge in Language Models",
EMNLP 2021), as the reference code builds it (nicola-decao/KnowledgeEditor
``src/models/one_shot_learner.py``; EasyEdit ``trainer/algs/KE.py``, which adapts it) and as MMEdit
conditions it (EasyEdit's multimodal datasets: ``cond = "{pred} >> {alt} || {src}"``).

Paper §3 (method): a hyper-network g, conditioned on the edit <x, y, a>, maps the fine-tuning
gradient to the update W' = W + sigmoid(eta) (alpha^ * grad_W L + beta^), with
alpha^ = softmax(alpha) gamma^T and beta^ = softmax(beta) delta^T (rank-1 mask and offset).
As the reference code builds it (``ConditionedParameter``, ``LSTMConditioner``), with G = dL/dW:

    c = tanh(F [LSTM->(e(x)); LSTM<-(e(x))])       x = "{pred} >> {alt} || {src}" (tokens, <= 32)
    row_a, col_a, row_b, col_b, eta = H_W(c)       H_W = WN-Linear -> tanh -> WN-Linear, per weight
    a = softmax(row_a) col_a^T,  b = softmax(row_b) col_b^T          (rank-1, [out, in])
    W' = W + max_scale * sigmoid(eta) * (G * a + b)                   (elementwise G * a)

- e: a word embedding initialised from the LM's input embeddings; a bidirectional one-layer LSTM;
  its final forward and backward states go through a tanh feed-forward layer (``LSTMConditioner``).
  The image never reaches the condition (the gradient G, computed on the edit input, does see it).
- ``pred`` is the record's ``pred`` (the unedited model's answer). When the record has none, mmke
  uses the model's top-1 predictions at the target positions of the edit input (teacher forced;
  the first token is the greedy answer's first token), decoded.
- The update is applied as W + dW with G the gradient of the loss: the network learns to descend.
  ``max_scale = 1`` (EasyEdit ``EFK``). G * a with a rank-1 a never forms G:
  G * (r c^T) = sum_t (delta_t * r)(u_t * c)^T, so dW is a rank N + 1 :class:`LowRank`.
- Widths: the paper's code passes ``hidden_dim = 128`` to both the LSTM and the per-weight
  networks, with ``condition_dim = 1024`` (KnowledgeEditor, bart_seq2seq_augmented_kilt.py);
  EasyEdit's OneShotLearner uses 512 and 768. Both are options (``hidden``, ``condition_dim``).
- Sites: EasyEdit has no multimodal KE config; its text configs edit the same matrices as MEND
  (both FFN matrices of the last three layers), which is the default here.
- Deviation (size): the reference trains the condition embedding (vocab x hidden, 113 MB for
  SmolLM2). By default mmke keeps it frozen at its initial value, the LM's input embedding
  (not stored with the weights); ``train_embedding=True`` trains and stores a copy as the
  reference does.

Training objective: the MMEdit trainer's (:mod:`mmke.editors.gradients`; the paper's own
objective is a constrained one with a KL margin, which MMEdit replaces with cedit/cloc weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mmke.editors.base import EditRequest
from mmke.editors.gradients import Captured, EditGradients, HyperNetConfig, HyperNetEditor, LowRank
from mmke.models.base import ModelAdapter


class KEConfig(HyperNetConfig):
    hidden: int = 128  # LSTM and per-weight network width (KnowledgeEditor: 128; EasyEdit: 512)
    condition_dim: int = 1024  # condition vector (KnowledgeEditor: 1024; EasyEdit: 768)
    max_scale: float = 1.0
    max_cond_tokens: int = 32  # EasyEdit truncates the condition text to 32 tokens
    train_embedding: bool = False  # reference: True (a trained copy, stored with the weights)


def condition_text(request: EditRequest, pred: str) -> str:
    """``"{pred} >> {alt} || {src}"`` from the MMEdit record (MMEdit's KE condition); without a
    record, the edit example's prompt and target stand in for src and alt."""
    rec = request.record
    src = rec.get("src", request.example.prompt)
    alt = rec.get("alt", request.example.target.strip())
    return f"{rec.get('pred') or pred} >> {alt} || {src}"


def input_embeddings(adapter: ModelAdapter) -> nn.Embedding:
    """The LM's input word embedding (the model or its ``lm`` part exposes
    ``get_input_embeddings``, as transformers models do)."""
    for m in (adapter.model, getattr(adapter.model, "lm", None), getattr(adapter.model, "language_model", None)):
        fn = getattr(m, "get_input_embeddings", None)
        if fn is not None and isinstance(fn(), nn.Embedding):
            return fn()
    raise ValueError(f"ke: cannot find the input embeddings of model {adapter.name!r} "
                     "(no get_input_embeddings on the model or its language model)")


class LSTMConditioner(nn.Module):
    """Token ids of the condition text [T] -> condition vector [condition_dim]."""

    def __init__(self, embedding: torch.Tensor, hidden: int, condition_dim: int, train_embedding: bool) -> None:
        super().__init__()
        if train_embedding:
            self.embedding = nn.Parameter(embedding.detach().float().clone())
        else:  # the LM's own embedding, frozen: not a parameter, not saved
            self.register_buffer("embedding", embedding.detach(), persistent=False)
        self.lstm = nn.LSTM(embedding.shape[1], hidden, num_layers=1, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, condition_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = F.embedding(ids[None], self.embedding, padding_idx=0).float()  # [1, T, E]
        _, (h, _) = self.lstm(e)  # h: [2, 1, hidden], final states of both directions
        return torch.tanh(self.out(torch.cat([h[0, 0], h[1, 0]], -1)))


class ConditionedParameter(nn.Module):
    """The update of one weight [out, in] from the condition and the gradient's factors."""

    def __init__(self, shape: tuple[int, int], condition_dim: int, hidden: int, max_scale: float) -> None:
        super().__init__()
        self.shape = shape
        o, i = shape
        self.net = nn.Sequential(weight_norm(nn.Linear(condition_dim, hidden)), nn.Tanh(),
                                 weight_norm(nn.Linear(hidden, 2 * (o + i) + 1)))
        self.max_scale = max_scale

    def factors(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(row_a [out], col_a [in], row_b [out], col_b [in], eta [1]) in the reference's split order."""
        o, i = self.shape
        col_a, row_a, col_b, row_b, eta = self.net(cond).split([i, o, i, o, 1])
        return row_a, col_a, row_b, col_b, eta

    def forward(self, cond: torch.Tensor, c: Captured) -> LowRank:
        row_a, col_a, row_b, col_b, eta = self.factors(cond)
        ra, rb = row_a.softmax(-1), row_b.softmax(-1)
        scale = self.max_scale * torch.sigmoid(eta)
        D, U = c.delta.float(), c.u.float()  # [N, out], [N, in]; G = D^T U
        left = torch.cat([(D * ra).T, rb[:, None]], 1) * scale  # [out, N + 1]
        right = torch.cat([U * col_a, col_b[None]], 0)  # [N + 1, in]
        return LowRank(left, right)


class KEModule(nn.Module):
    def __init__(self, embedding: torch.Tensor, shapes: list[tuple[int, int]], cfg: KEConfig) -> None:
        super().__init__()
        self.condition = LSTMConditioner(embedding, cfg.hidden, cfg.condition_dim, cfg.train_embedding)
        self.params = nn.ModuleList(ConditionedParameter(s, cfg.condition_dim, cfg.hidden, cfg.max_scale)
                                    for s in shapes)


class KEEditor(HyperNetEditor):
    name = "ke"
    Config = KEConfig

    def build_module(self) -> nn.Module:
        emb = input_embeddings(self.adapter).weight
        return KEModule(emb, [s.shape for s in self.sites], self.config)

    def condition_ids(self, request: EditRequest, grads: EditGradients) -> torch.Tensor:
        pred = self.adapter.tokenizer.decode(grads.pred_ids.tolist(), skip_special_tokens=True).strip()
        text = condition_text(request, pred)
        ids = self.adapter.tokenizer(text, truncation=True, max_length=self.config.max_cond_tokens).input_ids
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def condition(self, request: EditRequest, grads: EditGradients) -> torch.Tensor:
        """The condition vector of an edit: a function of its text only."""
        return self.module.condition(self.condition_ids(request, grads))

    def updates(self, grads: EditGradients, request: EditRequest) -> dict[str, LowRank]:
        cond = self.condition(request, grads)
        return {s.name: self.module.params[i](cond, grads.captured[s.name]) for i, s in enumerate(self.sites)}
