"""Scheduling budgets derived from the running graph."""

from deployments.budgets import budget


def test_a_budget_keeps_a_control_slot_per_replica_and_splits_among_routers():
    assert budget(64, 1, 1) == 63
    assert budget(64, 2, 2) == 63
    assert budget(2, 1, 4) == 1  # never none


def test_a_generator_budget_is_what_its_engines_run_at_once():
    """vLLM runs `max_num_seqs` sequences; more would queue inside it, unseen by the Router."""
    assert budget(64, 1, 1, runs_at_once=32) == 32
    assert budget(64, 2, 1, runs_at_once=32) == 64
    assert budget(8, 1, 1, runs_at_once=32) == 7
