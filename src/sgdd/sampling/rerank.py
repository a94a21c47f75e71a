"""Best-of-K reranking by re-embedding: keep the candidate whose encoder vector is closest to the input's.

Each input sentence gets K decoded candidates; all B*K candidates are re-encoded with the frozen encoder in
one call, compared to the input's vector by cosine similarity, and the argmax is returned. Pure apart from
the encoder call, which is passed in (`encode_fn(texts) -> (N, De)`), so it is testable with a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

EncodeFn = Callable[[list[str]], torch.Tensor]


def pick_best(
    candidates: Sequence[Sequence[str]], input_vectors: torch.Tensor, encode_fn: EncodeFn
) -> tuple[list[str], torch.Tensor]:
    """candidates: B lists of K strings; input_vectors (B, De); encode_fn(list of B*K str) -> (B*K, De).

    Returns (the chosen string per input, cosines (B, K) float32). Ties go to the first candidate.
    """
    B = len(candidates)
    if B == 0:
        return [], torch.zeros(0, 0)
    K = len(candidates[0])
    if K == 0 or any(len(c) != K for c in candidates):
        raise ValueError(
            f"pick_best needs the same positive number of candidates per input, got {[len(c) for c in candidates]}"
        )
    inputs = torch.as_tensor(input_vectors).float()
    if inputs.shape[0] != B:
        raise ValueError(f"{B} candidate lists but {inputs.shape[0]} input vectors")
    flat = [text for cands in candidates for text in cands]  # row-major: input b's K candidates together
    vecs = torch.as_tensor(encode_fn(flat)).float().to(inputs.device)  # (B*K, De)
    vecs = vecs.view(B, K, -1)
    cosines = F.cosine_similarity(vecs, inputs[:, None, :], dim=-1)  # (B, K)
    best = cosines.argmax(dim=1).tolist()
    return [candidates[b][best[b]] for b in range(B)], cosines
