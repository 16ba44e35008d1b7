"""Message, config and metric keys shared by the ServerApp and the ClientApp.

Every key that crosses the wire is defined here once; server and site import it,
so no string literal for a key appears twice in the code base.
"""

from typing import Final

# --- records inside a Message --------------------------------------------------
ARRAYS: Final = "arrays"  # ArrayRecord: adapter + head tensors, never the backbone
CONFIG: Final = "config"  # ConfigRecord: what the server asks for this round
METRICS: Final = "metrics"  # MetricRecord: numbers a site reports back
STATUS: Final = "status"  # ConfigRecord: site identity, ok/refused, refusal reason

# --- ConfigRecord sent by the server (train and evaluate) ------------------------
SERVER_ROUND: Final = "server-round"
LOCAL_EPOCHS: Final = "local-epochs"
LR: Final = "lr"
BATCH_SIZE: Final = "batch-size"
DP_ENABLED: Final = "dp-enabled"
NOISE_MULTIPLIER: Final = "noise-multiplier"
MAX_GRAD_NORM: Final = "max-grad-norm"
RUN_ID: Final = "run-id"
PHASE: Final = "phase"  # continual scenarios: the 0-based phase of the round
# The federation run's name (its run directory's, unchanged by a resume): a site keeps its
# continual state under <site-dir>/continual/<run key>/ (client/memory.py).
RUN_KEY: Final = "run-key"
FREEZE_LORA_A: Final = "freeze-lora-a"  # FFA-LoRA: sites keep lora_A at the shared seed
PROXIMAL_MU: Final = "proximal-mu"  # FedProx μ (Flower's FedProx sets this key)
# sha256 of the server's backbone-path checkpoint (imaging.local): a site whose own copy
# differs refuses the round.
BACKBONE_SHA256: Final = "backbone-sha256"
WIRE_DTYPE: Final = "wire-dtype"  # dtype the site replies its tensors in (strategies.wire)
# ArrayRecord sent with train messages of site-incremental ewc: the server's sum of the
# earlier phases' DP diagonal Fishers (FedCurv-style, client/continual.py).
FISHER: Final = "ewc-fisher"
# ArrayRecord sent with each train message of a ``scaffold`` run: that site's control-variate
# correction c − c_i (Karimireddy et al., ICML 2020), added to every local gradient step.
SCAFFOLD_CORRECTION: Final = "scaffold-correction"
# Flower message type of the server's end-of-phase query for a site's DP Fisher
# (``ClientApp.query("ewc_fisher")``).
QUERY_FISHER: Final = "query.ewc_fisher"

# Secure aggregation (server.secagg, client.secagg): the ConfigRecord of each SecAgg+
# stage (its fields are Flower's own ``secaggplus_constants.Key``), the Flower message
# types of the stages that are queries (the masked-vector stage is the train message),
# the site's protocol state in its Context, and the masked weight factor of a reply.
SECAGG: Final = "secagg"
QUERY_SECAGG_SETUP: Final = "query.secagg_setup"
QUERY_SECAGG_SHARE_KEYS: Final = "query.secagg_share_keys"
QUERY_SECAGG_UNMASK: Final = "query.secagg_unmask"
SECAGG_STATE: Final = "fedadapt.secagg-state"
SECAGG_FACTOR: Final = "secagg-factor"  # ArrayRecord: the masked weight factor
SECAGG_SEED_DIGEST: Final = "seed-sha256"  # share-keys reply: sha256 of the mask seed
SECAGG_NOISE: Final = "noise"  # setup: "none" or "skellam"
SECAGG_NOISE_VARIANCE: Final = "noise-variance"  # setup: each site's Skellam variance
SECAGG_CLIP_NORM: Final = "clip-norm"  # setup: the L2 bound of each site's update

# --- MetricRecord replied by a site ----------------------------------------------
NUM_EXAMPLES: Final = "num-examples"  # Flower's default weighting key
TRAIN_LOSS: Final = "train-loss"
EVAL_LOSS: Final = "eval-loss"
EVAL_ACC: Final = "eval-acc"
# Per-site evaluation with the site's personal tensors (``personal-keys``) loaded over
# the global ones; EVAL_LOSS / EVAL_ACC are the global model's as received.
EVAL_LOSS_PERSONAL: Final = "eval-loss-personal"
EVAL_ACC_PERSONAL: Final = "eval-acc-personal"
EPSILON: Final = "epsilon"  # record-level ε spent by the site so far (all rounds)
EPSILON_ROUND: Final = "epsilon-round"  # record-level ε of this round alone
DELTA: Final = "delta"
STEPS: Final = "steps"
SAMPLE_RATE: Final = "sample-rate"
PARTITION_ID: Final = "partition-id"
LORA_RANK: Final = "lora-rank"  # the LoRA rank the site trained at (its own, <= the run's)
# The task's further evaluation metrics (``imaging.tasks.TaskScores``), by name:
# classification and multilabel add balanced accuracy and ROC AUC; segmentation adds
# the mean foreground Dice (EVAL_ACC is then the voxel accuracy).
EVAL_METRICS: Final = {"balanced_accuracy": "eval-balanced-acc", "auc": "eval-auc",
                       "dice": "eval-dice"}
EVAL_ACC_PHASE: Final = "eval-acc-phase-{}"  # continual: accuracy on phase j's test set
NUM_EXAMPLES_PHASE: Final = "num-examples-phase-{}"  # continual: its size
# The site's drift monitor (run config drift-monitor, client/drift_monitor.py), in a train
# reply: all that leaves the site of it (a documented known leak, docs/privacy/known-leaks.md).
DRIFT_ALERT: Final = "drift-alert"  # 1 if any test rejected at its share of drift-alpha
DRIFT_MMD_P: Final = "drift-mmd-p"  # MMD permutation p-value of the embeddings
DRIFT_KS_P: Final = "drift-ks-p"  # smallest Benjamini-Hochberg adjusted per-dimension KS p
DRIFT_PRED_P: Final = "drift-pred-p"  # p-value of the predicted-class distribution test
DRIFT_REFERENCE_ROUND: Final = "drift-reference-round"  # the round the reference was built

# --- ConfigRecord `STATUS` replied by a site --------------------------------------
SITE_ID: Final = "site-id"
STATE: Final = "state"
STATE_OK: Final = "ok"
STATE_REFUSED: Final = "refused"
STATE_IDLE: Final = "idle"  # not this site's phase (continual site-incremental)
REASON: Final = "reason"
ACCOUNTANT: Final = "accountant"  # the site's accountant (rdp or prv), from its policy
EPSILON_SPENT: Final = "epsilon-spent"  # in a refusal: ε already spent (all runs)
EPSILON_REMAINING: Final = "epsilon-remaining"  # in a refusal: cap - spent
EPSILON_CAP: Final = "epsilon-cap"  # the site's own cap (reported, never sent down)
BUDGET_SPENT: Final = "budget-spent"  # in a refusal: true if the site will never train again

# --- node config (Flower sets these in simulation) --------------------------------
NODE_PARTITION_ID: Final = "partition-id"
NODE_NUM_PARTITIONS: Final = "num-partitions"
# A deployed site's own folder (policy.toml, ledger/, site.toml); set by the site
# engineer in the SuperNode's --node-config, never by the server.
NODE_SITE_DIR: Final = "site-dir"
