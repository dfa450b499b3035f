"""What the harness shows of a federated run's log lines: one line per round, every warning and error."""

from simulations.progress import RoundProgress

# Lines as `flwr run --stream` passes them on: Flower's colours, and a market's lines through Ray.
STREAM = [
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)",
    "\x1b[36m(ClientAppActor pid=7)\x1b[0m \x1b[93mWARNING \x1b[0m:   "
    "Market m00 is out of privacy budget (lifetime epsilon 8.000)",
    "\x1b[91mERROR \x1b[0m:     The market's training failed: m01.csv line 2: rating 'x' is not a number",
    "\x1b[91mERROR \x1b[0m:     The market's training failed: m01.csv line 2: rating 'x' is not a number",
    "\x1b[93mWARNING \x1b[0m:   1 of 3 markets did not reply within 600 s; going on without them.",
    "\x1b[92mINFO \x1b[0m:      round 0 market m00: val NDCG@10 0.1000 HR@10 0.2000 | test NDCG@10 0.3000 HR@10 0.4000",
    "\x1b[92mINFO \x1b[0m:      round 0 market m02: val NDCG@10 0.2000 HR@10 0.3000 | test NDCG@10 0.5000 HR@10 0.6000",
    "\x1b[92mINFO \x1b[0m:      round 1: bytes down/up per market: m00 10/10, m02 10/10",
    "\x1b[36m(raylet)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor",
]


def shown(capsys, verbose: bool) -> list[str]:
    with RoundProgress("fedavg", 2, ["m00", "m01", "m02"], verbose) as progress:
        for line in STREAM:
            progress(line)
    return capsys.readouterr().out.splitlines()


def test_by_default_a_line_per_round_and_every_warning_and_error_once(capsys):
    lines = shown(capsys, verbose=False)

    assert lines[:3] == [
        "    WARNING: Market m00 is out of privacy budget (lifetime epsilon 8.000)",
        "    ERROR: The market's training failed: m01.csv line 2: rating 'x' is not a number",
        "    WARNING: 1 of 3 markets did not reply within 600 s; going on without them.",
    ]
    assert lines[3].startswith(
        "    round 0/2: macro val NDCG@10 0.1500, test NDCG@10 0.4000 (2 of 3 markets replied; failed or silent: m01), "
    )
    assert len(lines) == 4


def test_verbose_adds_each_markets_line_and_the_rounds(capsys):
    lines = shown(capsys, verbose=True)

    assert "    [ROUND 1/2]" in lines
    assert "    round 0 market m02: val NDCG@10 0.2000 HR@10 0.3000 | test NDCG@10 0.5000 HR@10 0.6000" in lines
    assert any(line.startswith("    round 0/2: macro val NDCG@10 0.1500") for line in lines)
