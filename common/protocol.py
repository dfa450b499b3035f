"""The one wire contract: every key the ServerApp (:mod:`server`) and the markets' ClientApps (:mod:`clients`) exchange.

Both apps import their message keys from here and spell none of them themselves
(``tests/common/test_protocol.py`` checks it), so that a key renamed on one side cannot
silently go missing on the other. Neither app imports the other; this module imports
nothing at all. Each key below names the record it lives in, who writes it and who
reads it.

Records of a message (the keys of its ``RecordDict``)
    ``arrays`` (:data:`ARRAYS_RECORD`, ArrayRecord): server -> market, the shared arrays
    (fedals: the item factors of the market's rows, the Gram, the user Gram); market ->
    server, its trained shared arrays (fedals: its item statistics). ``config``
    (:data:`CONFIG_RECORD`, ConfigRecord): server -> market, the round's settings.
    ``metrics`` (:data:`METRICS_RECORD`, MetricRecord): market -> server, the reply's
    numbers. ``market`` (:data:`MARKET_KEY`, ConfigRecord): market -> server, its name
    under :data:`MARKET_NAME_KEY`. Flower's FedAvg writes ``arrays`` and ``config``
    under these names (its ``arrayrecord_key`` and ``configrecord_key``; the server
    passes them explicitly), and reads the aggregation weight :data:`NUM_EXAMPLES_KEY`.

Config (server -> market, in :data:`CONFIG_RECORD`)
    Every message: :data:`SERVER_ROUND_KEY` (FedAvg and :mod:`server.fedals` write it),
    :data:`TRAINING_ID_KEY`, :data:`CONTINUES_KEY`. Train messages: :data:`TRAIN_CONFIG_KEYS` (written by
    ``server.server_app.RunConfig.train_config``, read by
    ``clients.client_app.train_config_from``) and :data:`EVALUATE_RECEIVED_KEY`. The last
    round's evaluate message: :data:`FINAL_ROUND_KEY`, and for fedper-ft
    :data:`FINE_TUNE_EPOCHS_KEY` with the train settings. fedals' train and evaluate
    messages also carry ``common.ials.wire.INITIAL_ROWS_KEY``.

Arrays (in :data:`ARRAYS_RECORD`)
    fedals' array names live beside their packing in :mod:`common.ials.wire`
    (``STATISTICS_KEYS`` and ``ASSORTMENT_KEY`` = ``REPLY_KEYS`` from a market; the item
    factors, Gram and ``item-rows`` count of ``pack_item_factors`` to it, ``ITEM_SIDE_KEYS``); the
    server adds :data:`USER_GRAM_KEY`.
    The SGD methods' arrays are named by the model's parameters.

Metrics (market -> server, in :data:`METRICS_RECORD`)
    :data:`NUM_EXAMPLES_KEY` (the FedAvg weight) and :data:`TRAINED_KEY` (the weight under
    market-level DP), :data:`TRAIN_LOSS_KEY`, :data:`TRAIN_SECONDS_KEY`, the
    :data:`EVALUATION_METRICS`; the previous round's evaluation folded into a train reply
    under :data:`RECEIVED_PREFIX`; fedper-ft's fork under :data:`FINE_TUNE_PREFIX`,
    fedals-pt's transfer under :data:`TRANSFER_PREFIX`; under DP the privacy spent (the
    keys of ``common.privacy.ledger.PrivacyLedger.spent``: ``epsilon``, ``delta``),
    :data:`INSECURE_NOISE_MARKER` and :data:`EXACT_METRICS_MARKER`. The server keeps every
    metric in its history and reads the weights and the evaluation metrics.

The values are the strings on the wire: changing one breaks every market and server
of the other version, and the histories written before.
"""

# --- the records of a message -----------------------------------------------------------------
ARRAYS_RECORD = "arrays"  # ArrayRecord, both ways: the shared arrays (fedals: factors to, statistics from a market)
CONFIG_RECORD = "config"  # ConfigRecord, server -> market: the round's settings below
METRICS_RECORD = "metrics"  # MetricRecord, market -> server: the reply's numbers below
MARKET_KEY = "market"  # ConfigRecord, market -> server: names the replying market (server.replies binds it)
MARKET_NAME_KEY = "name"  # in MARKET_KEY's record: the market's name (a str common.runtime.names accepts)

# --- config, server -> market -----------------------------------------------------------------
SERVER_ROUND_KEY = "server-round"  # int, every message: the round (FedAvg writes it; round 0 is the start)
TRAINING_ID_KEY = "training-id"  # str, every message: the training; markets key their ledgers and state on it
# str, every message: the training whose published shared part this one started from (init-from), "" for a
# training from scratch; a deployed region starts from its head of that training, or else from a new head.
CONTINUES_KEY = "continues-training"
LOCAL_EPOCHS_KEY = "local-epochs"  # int, train: passes over its data a market makes this round
HEAD_EPOCHS_KEY = "head-epochs"  # int, train: fedrep's epochs on the head before the encoder's
BATCH_SIZE_KEY = "batch-size"  # int, train: interactions per local step (DP-SGD uses the market's own)
LEARNING_RATE_KEY = "learning-rate"  # float, train: the local Adam step size (DP-SGD uses the market's own)
NEGATIVES_KEY = "negatives"  # int, train: sampled negatives per positive in the local loss
SCORE_PENALTY_KEY = "score-penalty"  # float, train: the local regulariser on squared scores
TRAIN_CONFIG_KEYS = (  # the local training settings of every train message, in this order
    LOCAL_EPOCHS_KEY,
    HEAD_EPOCHS_KEY,
    BATCH_SIZE_KEY,
    LEARNING_RATE_KEY,
    NEGATIVES_KEY,
    SCORE_PENALTY_KEY,
)
EVALUATE_RECEIVED_KEY = "evaluate-received"  # bool, train: evaluate the received model before training (folded)
FINE_TUNE_EPOCHS_KEY = "fine-tune-epochs"  # int, last evaluate (fedper-ft): epochs of the private fork, capped locally
FINAL_ROUND_KEY = "final-round"  # bool, last evaluate: each market writes its served model
# bool, train and the last evaluate of a refit for serving (serve-refit, fedals): the round trains on every
# interaction of the market (training, validation and test), and the last evaluate writes that refit as the
# served model instead of the best validation round
REFIT_KEY = "refit-for-serving"

# --- arrays, server -> market -----------------------------------------------------------------
USER_GRAM_KEY = "user-gram"  # fedals without DP: Σ of the markets' augmented user Grams of the last aggregated round

# --- metrics, market -> server ----------------------------------------------------------------
NUM_EXAMPLES_KEY = "num-examples"  # int: the aggregation weight (FedAvg's weighted_by_key); 0 out of budget
TRAINED_KEY = "trained"  # int: 1 when the market trained this round; the weight under market-level DP
TRAIN_LOSS_KEY = "train-loss"  # float: the round's mean local training loss (NaN out of budget)
TRAIN_SECONDS_KEY = "train-seconds"  # float: seconds of the round's local training
VAL_NDCG_KEY = "val-ndcg"  # float: validation NDCG@10 against sampled negatives
VAL_HR_KEY = "val-hr"  # float: validation hit rate@10 against sampled negatives
VAL_FULL_NDCG_KEY = "val-full-ndcg"  # float: validation NDCG@10 over the full catalog
VAL_FULL_RECALL_KEY = "val-full-recall"  # float: validation recall@10 over the full catalog
TEST_NDCG_KEY = "test-ndcg"  # float: test NDCG@10 against sampled negatives
TEST_HR_KEY = "test-hr"  # float: test hit rate@10 against sampled negatives
TEST_FULL_NDCG_KEY = "test-full-ndcg"  # float: test NDCG@10 over the full catalog
TEST_FULL_RECALL_KEY = "test-full-recall"  # float: test recall@10 over the full catalog
EVALUATION_METRICS = (  # an evaluation's numbers, in reply order (with NUM_EXAMPLES_KEY, the test users)
    VAL_NDCG_KEY,
    VAL_HR_KEY,
    VAL_FULL_NDCG_KEY,
    VAL_FULL_RECALL_KEY,
    TEST_NDCG_KEY,
    TEST_HR_KEY,
    TEST_FULL_NDCG_KEY,
    TEST_FULL_RECALL_KEY,
)
RECEIVED_PREFIX = "received-"  # train reply: the received model's evaluation (EVALUATE_RECEIVED_KEY), the last round's
FINE_TUNE_PREFIX = "ft-"  # last evaluate reply: fedper-ft's fork, "epochs" and the EVALUATION_METRICS at its best epoch
TRANSFER_PREFIX = "pt-"  # last evaluate reply: fedals-pt's served fit, its EVALUATION_METRICS
INSECURE_NOISE_MARKER = "dp-insecure-seeded-noise"  # int: 1 when the market's DP noise was seeded (insecure)
EXACT_METRICS_MARKER = "dp-exact-metrics"  # int: 1 when a DP market's region chose to send exact metrics

__all__ = [
    "ARRAYS_RECORD",
    "BATCH_SIZE_KEY",
    "CONFIG_RECORD",
    "CONTINUES_KEY",
    "EVALUATE_RECEIVED_KEY",
    "EVALUATION_METRICS",
    "EXACT_METRICS_MARKER",
    "FINAL_ROUND_KEY",
    "REFIT_KEY",
    "FINE_TUNE_EPOCHS_KEY",
    "FINE_TUNE_PREFIX",
    "HEAD_EPOCHS_KEY",
    "INSECURE_NOISE_MARKER",
    "LEARNING_RATE_KEY",
    "LOCAL_EPOCHS_KEY",
    "MARKET_KEY",
    "MARKET_NAME_KEY",
    "METRICS_RECORD",
    "NEGATIVES_KEY",
    "NUM_EXAMPLES_KEY",
    "RECEIVED_PREFIX",
    "SCORE_PENALTY_KEY",
    "SERVER_ROUND_KEY",
    "TEST_FULL_NDCG_KEY",
    "TEST_FULL_RECALL_KEY",
    "TEST_HR_KEY",
    "TEST_NDCG_KEY",
    "TRAINED_KEY",
    "TRAINING_ID_KEY",
    "TRAIN_CONFIG_KEYS",
    "TRAIN_LOSS_KEY",
    "TRAIN_SECONDS_KEY",
    "TRANSFER_PREFIX",
    "USER_GRAM_KEY",
    "VAL_FULL_NDCG_KEY",
    "VAL_FULL_RECALL_KEY",
    "VAL_HR_KEY",
    "VAL_NDCG_KEY",
]
