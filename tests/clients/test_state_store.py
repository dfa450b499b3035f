"""A market's durable state: saved after every round, restored by a restarted SuperNode."""

import os
import stat
import threading
import time

import pytest
import torch

from clients.state_store import KEPT_HEADS, CorruptStateError, LedgerEntry, LedgerStore, MarketState, MarketStateStore
from common.privacy.ledger import PrivacyBudget, PrivacyLedger


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(PrivacyBudget(8.0, 1e-5), 1.2, 0.1, history=[(1.2, 0.1, 12)], releases=[3.0])


def test_a_saved_state_comes_back_unchanged(tmp_path):
    store = MarketStateStore(tmp_path / "state", "de")
    state = MarketState(
        "run-1",
        3,
        {"head.item_bias.weight": torch.arange(4.0)},
        own_arrays={"encoder.tower.bias": torch.ones(2)},
        private=True,
    )

    store.save(state)
    restored = store.load()

    assert restored.training_id == "run-1" and restored.last_round == 3 and restored.private
    assert torch.equal(restored.head["head.item_bias.weight"], torch.arange(4.0))
    assert torch.equal(restored.own_arrays["encoder.tower.bias"], torch.ones(2))
    # Only the state file (and its lock) in the directory: no temporary file left behind.
    assert sorted(path.name for path in (tmp_path / "state").iterdir()) == ["de.pt", "de.pt.lock"]


def test_a_new_training_keeps_the_head_of_the_one_before_and_each_is_found_by_its_training(tmp_path):
    # Prepare: training 7 saved its head twice, then clients.join a head from training 9's published part.
    store = MarketStateStore(tmp_path, "de")
    store.save(MarketState("7", 1, {"head.w": torch.zeros(2)}))
    store.save(MarketState("7", 2, {"head.w": torch.ones(2)}))

    # Execute: training 8 saves its first head, then a join from training 9's published part.
    store.save(MarketState("8", 1, {"head.w": torch.full((2,), 8.0)}))
    store.save(MarketState("join-9", 0, {"head.w": torch.full((2,), 9.0)}))

    # Assert: the latest is the join; 7's last head and 8's are kept, each found by its training;
    # a join's head is found by the training it joined; an unknown training has none.
    assert store.load().training_id == "join-9"
    assert store.trainings() == ["7", "8"]
    assert store.load_training("7").last_round == 2 and torch.equal(
        store.load_training("7").head["head.w"], torch.ones(2)
    )
    assert torch.equal(store.load_training("8").head["head.w"], torch.full((2,), 8.0))
    assert store.load_training("9").training_id == "join-9"
    assert store.load_training("10") is None


def test_a_server_naming_ever_new_trainings_leaves_a_bounded_number_of_heads(tmp_path):
    store = MarketStateStore(tmp_path, "de")

    for training in range(KEPT_HEADS + 5):
        store.save(MarketState(str(training), 1, {"head.w": torch.zeros(2)}))
        time.sleep(0.02)  # heads are aged by their files' times, which the file system keeps in ticks of a few ms

    # the latest in de.pt, the KEPT_HEADS trainings before it kept, the older ones gone
    assert store.load().training_id == str(KEPT_HEADS + 4)
    assert sorted(map(int, store.trainings())) == list(range(4, KEPT_HEADS + 4))


def test_a_training_id_that_is_not_a_name_is_refused_before_it_reaches_a_path(tmp_path):
    store = MarketStateStore(tmp_path, "de")
    with pytest.raises(ValueError, match="training"):
        store.load_training("../../etc/passwd")


def test_state_and_ledger_files_are_private_to_their_owner(tmp_path):
    # Prepare: a permissive umask must not make a head (per-user embeddings) readable by others.
    old = os.umask(0o022)
    try:
        MarketStateStore(tmp_path, "de").save(MarketState("t", 1, {"head.w": torch.zeros(2)}))
        LedgerStore(tmp_path, "de").save(LedgerEntry(_ledger(), "t", {}, []))
    finally:
        os.umask(old)

    for name in ("de.pt", "de.ledger.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_a_saved_ledger_comes_back_unchanged(tmp_path):
    store = LedgerStore(tmp_path, "de")
    store.save(LedgerEntry(_ledger(), "run-1", {"users": 10}, [{"epsilon": 1.0}]))

    entry = store.load()

    assert entry.ledger == _ledger() and entry.training_id == "run-1"
    assert entry.calibration == {"users": 10} and entry.periods == [{"epsilon": 1.0}]


def test_a_market_without_saved_state_starts_afresh(tmp_path):
    assert MarketStateStore(tmp_path, "de").load() is None
    assert LedgerStore(tmp_path, "de").load() is None


def test_an_unreadable_state_file_is_named_and_left_in_place(tmp_path):
    (tmp_path / "de.pt").write_bytes(b"not a torch file")

    with pytest.raises(CorruptStateError, match="de.pt: the saved market state cannot be read"):
        MarketStateStore(tmp_path, "de").load()
    assert (tmp_path / "de.pt").read_bytes() == b"not a torch file"


@pytest.mark.parametrize(
    "saved",
    [
        [1, 2, 3],
        {"training-id": "t"},
        {"training-id": "t", "last-round": 1, "head": [1, 2]},
        {"training-id": "t", "last-round": "x", "head": {}},
    ],
)
def test_a_loadable_but_wrong_state_file_is_named(tmp_path, saved):
    # A file torch can load that is not a market state must not raise a bare TypeError or KeyError.
    torch.save(saved, tmp_path / "de.pt")

    with pytest.raises(CorruptStateError, match="de.pt: the saved market state"):
        MarketStateStore(tmp_path, "de").load()


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 1, "market": "fr"}', '{"format": 1, "market": "de"}'])
def test_an_unreadable_ledger_stops_dp_and_says_what_is_lost(tmp_path, text):
    (tmp_path / "de.ledger.json").write_text(text)

    with pytest.raises(CorruptStateError, match="Everything the market spent before is unknown"):
        LedgerStore(tmp_path, "de").load()


@pytest.mark.parametrize("market", ["../../x", "a/b", "..", ""])
def test_a_market_name_cannot_put_its_state_outside_the_state_dir(tmp_path, market):
    with pytest.raises(ValueError, match="is not allowed"):
        MarketStateStore(tmp_path, market)
    with pytest.raises(ValueError, match="is not allowed"):
        LedgerStore(tmp_path, market)


def test_concurrent_writers_of_one_state_file_never_fail(tmp_path):
    # Two writers once shared the temp name '<market>.tmp' and one's rename failed.
    store = MarketStateStore(tmp_path, "de")
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for step in range(20):
                store.save(MarketState(f"w{worker}", step, {"head.w": torch.full((64,), float(step))}))
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert store.load().last_round == 19
