"""Clients that fail to report (`--client-dropout p`), the same on both engines.

Each round, after the server samples its clients (federate.sample_clients), every sampled client
fails to report with probability p: it sends nothing, and the round aggregates the others. A
round in which none reports keeps the global state (accept_and_aggregate gets no update). The
draw comes from a generator of its own, seeded by (the run's seed, the round), so the sampling
generator is untouched, both engines (federate.py, flower_app.py) drop the same clients in the
same rounds, and a resumed run drops what the whole run would have.
"""
import numpy as np

STREAM = 17  # keeps this generator apart from the other seeded draws of a run


def dropped_clients(seed: int, round_index: int, sampled: list, n_clients: int, p: float) -> list:
    """The sampled clients that fail to report this round, sorted: client c fails when the c-th
    uniform draw of the round's generator falls below p (one draw per client of the federation,
    so whether c fails does not depend on who else was sampled)."""
    draws = np.random.default_rng([seed, round_index, STREAM]).random(n_clients)  # (n_clients,)
    return sorted(c for c in sampled if draws[c] < p)


def drop_out(cfg, round_index: int, sampled: list, log) -> tuple:
    """(the sampled clients that report, what the round's row of metrics.json says of the
    drop-outs) of a round, with a log line when a client dropped out."""
    dropped = dropped_clients(cfg.seed, round_index, sampled, cfg.clients, cfg.client_dropout)
    reporting = [c for c in sampled if c not in dropped]
    if dropped:
        log(f"round {round_index}: client(s) {dropped} dropped out (--client-dropout {cfg.client_dropout:g})"
            + ("; none reported, the global state stays as it was" if not reporting else ""))
    return reporting, {"clients_sampled": list(sampled), "clients_dropped": dropped, "none_reported": not reporting}
