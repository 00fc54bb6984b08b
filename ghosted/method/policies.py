"""Token policies: which calibration tokens enter a cut's least-squares sums, and how the fit uses them.

One registered `TokenPolicy` per name declares everything the rest of the code asks about it:
- capture (ghosted.calibration): which tokens leave the fit (position 0 and BOS) and what is kept
  of the left-out tokens (nothing, their mean move, or their full sums);
- fit (ghosted.solve): which captured sums are combined (`GroupedSums.sums`) and whether the operator
  gets a sink shift for position 0;
- guard (ghosted.solve): a meta policy ("auto") names the policies the held-out guard chooses among, the one
  used when no held-out check runs, and the one ghost-aware selection fits with.

This module imports no torch at load time: the CLI builds its help text from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ghosted.errors import GhostedError, brief
from ghosted.method.catalog import Registry

if TYPE_CHECKING:
    import torch

    from ghosted.method.sums import GroupedSums, PairSums

Pair = tuple[int, int]
LeftOut = Literal["none", "mean", "full"]
Combine = Literal["kept", "all", "anchor"]


@dataclass(frozen=True)
class TokenPolicy:
    """One token policy (recorded by name in the checkpoint). Get a registered one with `get_policy(name)`."""

    name: str
    help: str  # one phrase for --help
    drop_sinks: bool = True  # position 0 of every window and every BOS token leave the fit
    left_out: LeftOut = "none"  # what the capture keeps of the left-out tokens: nothing, mean move, full sums
    # Sums the fit uses: the kept tokens; kept + left out (every token, also from a capture that kept the
    # left-out tokens apart, e.g. under auto); or kept + left out pinned to identity.
    combine: Combine = "kept"
    sink_shift: bool = False  # position 0 gets h + mean(Y - X) over the left-out tokens at inference
    detector: bool = False  # tokens whose n(h) looks like the left-out tokens' get their mean move (one rule for all)
    candidates: tuple[str, ...] = ()  # meta policy: what the held-out guard chooses among, in this order
    unguarded: str | None = None  # meta policy: the policy used when no held-out check runs
    selection: str | None = None  # meta policy: the policy ghost-aware selection fits its candidate blocks with

    def __post_init__(self) -> None:
        if self.drop_sinks == (self.left_out == "none"):
            raise ValueError(f"token policy {self.name}: left_out must be 'none' exactly when no token is left out")
        if self.combine == "anchor" and self.left_out != "full":
            raise ValueError(f"token policy {self.name}: an anchor fit needs the left-out tokens' full sums")
        if (self.sink_shift or self.detector) and self.left_out == "none":
            raise ValueError(f"token policy {self.name}: a sink shift needs the left-out tokens' mean move")

    # --- guard ---------------------------------------------------------------------------------------

    @property
    def guard_choices(self) -> tuple[str, ...]:
        """The policies the held-out guard compares (itself, or a meta policy's candidates)."""
        return self.candidates or (self.name,)

    @property
    def one_map(self) -> str:
        """The nearest policy whose operator treats every position alike (what llama.cpp can run): a sink
        shift's policy without its position-0 rule."""
        return "detect" if self.sink_shift else self.name

    @property
    def without_guard(self) -> str:
        """The policy fitted when no held-out check runs."""
        return self.unguarded or self.name

    @property
    def for_selection(self) -> str:
        """The policy ghost-aware selection fits its candidate blocks with."""
        return self.selection or self.name

    def describe(self) -> str:
        """The help phrase; a meta policy's names its candidates."""
        if not self.candidates:
            return self.help
        *first, last = self.candidates
        return (f"{self.help}: the held-out guard picks {', '.join(first)} or {last}; "
                f"{self.without_guard} without a held-out check")

    # --- capture -------------------------------------------------------------------------------------

    def base_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_id: int | None) -> torch.Tensor:
        """[B, T] bool: tokens that may enter the sums."""
        import torch  # here, not at module load: the CLI reads the registry without torch

        mask = attention_mask.bool().clone()
        if self.drop_sinks:
            # first real token of each row (left padding aware)
            first = attention_mask.long().argmax(dim=1)
            mask[torch.arange(mask.shape[0]), first] = False
            if bos_id is not None:
                mask &= input_ids != bos_id
        return mask

    # --- fit -----------------------------------------------------------------------------------------

    def fit_sums(self, res: GroupedSums, cut: Pair, group: str) -> PairSums:
        """The sums of one cut over windows `group` (fit | heldout | total) that this policy's fit uses."""
        combine = self.combine
        if combine == "all" and not res.fit_left_out:  # captured under "all": the kept tokens are all tokens
            combine = "kept"
        return res.sums(cut, group, combine)

    def shift(self, res: GroupedSums, cut: Pair, group: str) -> torch.Tensor | None:
        """The sink shift mean(Y - X) over the left-out tokens of `group`; None when the policy has none."""
        if not self.sink_shift:
            return None
        left = res.left_out(cut, group)
        if left is None or not left.n:
            return None
        return (left.sum_y - left.sum_x) / left.n


POLICIES: Registry[TokenPolicy] = Registry("token policy")
_ORDER: list[str] = []  # registration order, for help text


def register(policy: TokenPolicy) -> TokenPolicy:
    """Add a policy to the registry; a meta policy's names must be registered plain policies."""
    for ref in (*policy.candidates, policy.unguarded, policy.selection):
        if ref is not None and (ref not in POLICIES or POLICIES.get(ref).candidates):
            raise ValueError(f"token policy {policy.name} refers to {ref!r}, which is not a registered plain policy")
    POLICIES.register(policy.name)(policy)
    _ORDER.append(policy.name)
    return policy


def get_policy(name: str | TokenPolicy) -> TokenPolicy:
    """The registered policy of that name (GhostedError with a "did you mean" for an unknown one)."""
    if isinstance(name, TokenPolicy):
        return name
    if not isinstance(name, str):
        raise GhostedError(f"token policy must be a name, got {brief(name)}; choose from {', '.join(_ORDER)}")
    return POLICIES.get(name)


def policy_names() -> list[str]:
    """Registered policy names in registration order."""
    return list(_ORDER)


def help_text() -> str:
    """`--token-policy` help, from the registry (meta policies first)."""
    policies = sorted((POLICIES.get(name) for name in _ORDER), key=lambda p: not p.candidates)
    return "tokens in the fit: " + ", ".join(f"{p.name} ({p.describe()})" for p in policies)


register(TokenPolicy(
    "all", "every token; one map for every token at inference, as in the paper",
    drop_sinks=False, combine="all"))
register(TokenPolicy(
    # The attention-sink position maps across a cut unlike any other token and bends the fit (docs/method.md).
    "sink", "drop position 0 and BOS from the fit; position 0 gets the mean move of those tokens",
    left_out="mean", sink_shift=True))
register(TokenPolicy(
    # "sink" with a rule that reads the state instead of the position: what an exportable ghost uses for sinks.
    "detect", "drop position 0 and BOS from the fit; tokens whose h/rms(h) looks like theirs get their mean move "
    "(a linear detector fitted on the calibration sums; one rule for every position)",
    left_out="full", detector=True))
register(TokenPolicy(
    # The sinks stay in the fit with their own state as target: identity along the massive-activation directions.
    "anchor", "sinks stay in the fit pinned to identity",
    left_out="full", combine="anchor"))
register(TokenPolicy(
    # Captures the sums of "sink" plus, apart, the full sums of the tokens it leaves out, so that every
    # candidate can be fitted from one pass.
    "auto", "chosen per model and cut",
    left_out="full", candidates=("sink", "anchor", "all"), unguarded="all", selection="sink"))
