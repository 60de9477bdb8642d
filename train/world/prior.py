"""The world's prior over fact values, token by token: what a model that knows the world but not the person predicts.

Every attribute's value is drawn uniformly from its value space (``World.value_space``; birth dates uniformly over
year, month and day 1-28). Tokenized as the corpus writes it (``" " + value``: the byte-level BPE pre-tokenizer
splits words at spaces, so a value's tokens do not depend on the text around it), the values of one space form a
trie; at a node (a kind of value and the tokens of it written so far) the prior gives each next token the share of
the space's values that continue with it. A recall run of the corpus stream (consecutive recall tokens) whose
tokens spell one value of exactly one space is walked down that space's trie; the node before each of its tokens is
where a model that cannot tell the person apart should spread its mass (``objective.forget_target=world_prior``).

Shape legend: L stream length, N positions, E entries (one per (position, possible next token)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pure_reasoner.train.world import text as wt

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from pure_reasoner.train.world.types import World

# One attribute per distinct value space (employer_city shares birth_city's cities).
SPACE_ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "birth_country")


def value_space(world: World, attribute: str) -> tuple[str, ...]:
    """Every value ``attribute`` is drawn from, birth dates listed out (``num_years * 12 * 28`` of them)."""
    space = world.value_space(attribute)
    if space is not None:
        return space
    years = range(world.cfg.first_year, world.cfg.first_year + world.cfg.num_years)
    return tuple(wt.format_date(y, m, d) for y in years for m in range(1, 13) for d in range(1, 29))


@dataclass(frozen=True)
class ValuePrior:
    """Tries of the value spaces in CSR form.

    node_ptr: [num_nodes + 1] int64, the entries of node n are ``node_ptr[n]:node_ptr[n + 1]``;
    entry_token / entry_logq: [E] int64 / fp32, each entry a next token and its log prior (a node's entries sum to
    probability 1 over the values that continue past it); children: per node, token -> child node; ends: per
    node, whether a value ends there; roots: attribute -> root node.
    """

    node_ptr: torch.Tensor
    entry_token: torch.Tensor
    entry_logq: torch.Tensor
    children: tuple[dict[int, int], ...]
    ends: tuple[bool, ...]
    roots: dict[str, int]

    @classmethod
    def build(cls, world: World, tok: Tokenizer, attributes: Sequence[str] = SPACE_ATTRIBUTES) -> ValuePrior:
        children: list[dict[int, int]] = []
        ends: list[bool] = []
        weight: list[int] = []  # values passing through each node
        roots = {}
        for attribute in attributes:
            roots[attribute] = len(children)
            children.append({})
            ends.append(False)
            weight.append(0)
            for enc in tok.encode_batch([f" {v}" for v in value_space(world, attribute)]):
                node = roots[attribute]
                weight[node] += 1
                for token in enc.ids:
                    if token not in children[node]:
                        children[node][token] = len(children)
                        children.append({})
                        ends.append(False)
                        weight.append(0)
                    node = children[node][token]
                    weight[node] += 1
                ends[node] = True
        ptr, tokens, shares = [0], [], []
        for kids in children:
            total = sum(weight[c] for c in kids.values())
            for token, child in kids.items():
                tokens.append(token)
                shares.append(weight[child] / total)
            ptr.append(len(tokens))
        return cls(torch.tensor(ptr, dtype=torch.int64), torch.tensor(tokens, dtype=torch.int64),
                   torch.tensor(shares, dtype=torch.float64).log().float(), tuple(children), tuple(ends), roots)

    def walk(self, tokens: Sequence[int]) -> list[int] | None:
        """The nodes before each of ``tokens`` if they spell one whole value of exactly one space, else None."""
        found = None
        for root in self.roots.values():
            nodes, node = [], root
            for token in tokens:
                nodes.append(node)
                node = self.children[node].get(token)
                if node is None:
                    break
            else:
                if self.ends[node]:
                    if found is not None:
                        return None  # spelled in two spaces: not this prior's to say
                    found = nodes
        return found

    def stream_nodes(self, stream_L: torch.Tensor, recall_L: torch.Tensor) -> torch.Tensor:
        """[L] int64: at each recall token of a run ``walk`` resolves, the node before it (the prior of the target
        that is that token); -1 elsewhere (and on runs it does not resolve, e.g. a comparison's answered name). A run
        that does not resolve alone is tried once more with the token before it: where BPE leaves a value's leading
        space as a token of its own, that token lies outside the value's characters and so outside the run.

        Args:
            stream_L: [L] token ids.
            recall_L: [L] bool, the recall tokens (``data.recall_tokens``, in closed-book rows or not).
        """
        if stream_L.shape != recall_L.shape or recall_L.dtype != torch.bool:
            raise ValueError(f"recall_L must be bool of the stream's shape {tuple(stream_L.shape)}, got "
                             f"{recall_L.dtype} {tuple(recall_L.shape)}")
        nodes_L = torch.full_like(stream_L, -1)
        edge_L = torch.diff(recall_L.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                            append=torch.zeros(1, dtype=torch.int8))
        starts, stops = (edge_L == 1).nonzero().flatten().tolist(), (edge_L == -1).nonzero().flatten().tolist()
        ids = stream_L.tolist()
        for start, stop in zip(starts, stops, strict=True):
            nodes = self.walk(ids[start:stop])
            if nodes is None and start > 0:  # the value's leading space as a token of its own, outside the span
                nodes = self.walk(ids[start - 1 : stop])
                nodes = None if nodes is None else nodes[1:]
            if nodes is not None:
                nodes_L[start:stop] = torch.tensor(nodes, dtype=torch.int64)
        return nodes_L

    def entries(self, nodes_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_E, token_E, logq_E): every possible next token of each of the [N] nodes (all >= 0), with the index
        of its position in ``nodes_N`` and its log prior."""
        if nodes_N.numel() and (int(nodes_N.min()) < 0 or int(nodes_N.max()) >= len(self.children)):
            raise ValueError(f"prior nodes must lie in [0, {len(self.children)}), got "
                             f"[{int(nodes_N.min())}, {int(nodes_N.max())}]")
        ptr = self.node_ptr.to(nodes_N.device)
        first_N, count_N = ptr[nodes_N], ptr[nodes_N + 1] - ptr[nodes_N]
        row_E = torch.repeat_interleave(torch.arange(nodes_N.numel(), device=nodes_N.device), count_N)
        offset_E = torch.arange(row_E.numel(), device=nodes_N.device) - (count_N.cumsum(0) - count_N)[row_E]
        index_E = first_N[row_E] + offset_E
        return row_E, self.entry_token.to(nodes_N.device)[index_E], self.entry_logq.to(nodes_N.device)[index_E]
