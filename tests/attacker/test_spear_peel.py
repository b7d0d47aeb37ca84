"""Peeling (attacker/spear_peel.py): sample directions from rows active for few samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attacker  # noqa: F401  (registers every attack)
from attacker import spear_peel
from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch
from gradleak.core.models import create_model


def _planted(b: int = 10, m: int = 200, seed: int = 0):
    """Rows u_r = g_r Q^-1 of a planted Q, activity sparse enough to peel."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand((m, b), generator=gen, dtype=torch.float64) < 0.25
    active[torch.arange(2 * b), torch.arange(2 * b) % b] = True  # some singles
    active[: 2 * b] &= torch.eye(b, dtype=torch.bool).repeat(2, 1)
    g = torch.randn((m, b), generator=gen, dtype=torch.float64) * active
    q = torch.randn((b, b), generator=gen, dtype=torch.float64)
    u = g @ torch.linalg.inv(q)  # g = u q: sample i's column is u q_i
    return u, q, active


def _matches(found, q):
    """Index of the planted column each found direction is parallel to (or None)."""
    cols = F.normalize(q, dim=0)
    out = []
    for d in found:
        cos = (cols.T @ F.normalize(d, dim=0)).abs()
        out.append(int(cos.argmax()) if float(cos.max()) > 1 - 1e-9 else None)
    return out


def test_peeling_finds_every_planted_direction_exactly():
    u, q, _ = _planted()
    found, stalled = spear_peel.directions(u, torch.full((u.shape[0],), 1e-13, dtype=torch.float64))
    assert sorted(i for i in _matches(found, q) if i is not None) == list(range(q.shape[0]))
    assert not stalled


def test_a_cascade_that_avoids_a_sample_leaves_its_direction():
    u, q, _ = _planted(seed=1)
    noise = torch.full((u.shape[0],), 1e-13, dtype=torch.float64)
    v, flag = spear_peel.peel(u, noise, u.new_zeros((0, u.shape[1])))
    assert v.shape[0] == u.shape[1] - 1 and len(flag) == u.shape[1] - 1
    # Avoiding the first sample peeled: the last dimension left is that sample's q.
    rest, _ = spear_peel.peel(u, noise, u.new_zeros((0, u.shape[1])), avoid=flag[0])
    left = spear_peel.complement(rest, u.shape[1])[:, 0]
    first = _matches([left], q)[0]
    assert first is not None
    assert first not in _matches([spear_peel.complement(v, u.shape[1])[:, 0]], q)


def test_rows_without_sparse_activity_stall_instead_of_guessing():
    # Every unit active for every sample: no two rows are parallel in any quotient.
    gen = torch.Generator().manual_seed(2)
    u = torch.randn((100, 6), generator=gen, dtype=torch.float64)
    found, stalled = spear_peel.directions(u, torch.full((100,), 1e-13, dtype=torch.float64))
    assert found == [] and [k.shape[1] for k in stalled] == [6]


def test_a_batch_of_12_is_recovered_exactly_by_peeling_alone():
    torch.manual_seed(12)
    model = create_model("relu-mlp", in_channels=3, num_classes=10, image_size=16)
    gen = torch.Generator().manual_seed(12)
    x = torch.rand((12, 3, 16, 16), generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    obs = Observation(gradients=compute_gradients(model, x, y), batch_size=12,
                      input_shape=(3, 16, 16), num_classes=10)
    rec = create_attack("spear", AttackConfig(seed=0, time_budget_s=30)).reconstruct(model, obs)
    perm = match_batch(rec.images.numpy(), x.numpy())
    assert max(float((rec.images[int(perm[j])] - x[j]).abs().max()) for j in range(12)) < 1e-4
    assert rec.stats["stop_reason"] == "recovered"
    assert rec.stats["trials"] == 0  # no random row subset was needed
