"""Evaluations of a pretrained encoder: linear, semi-supervised fine-tuning, transfer.

- **Linear evaluation** (:func:`linear_eval`): the encoder is frozen (BN in eval mode); an
  L2-regularised multinomial logistic regression is fitted by L-BFGS on the standardised
  features h of the training images plus ``augment_copies`` crop + flip copies of them; the
  L2 weight is chosen on the val split, then the test split is scored (top-1, top-5,
  confusion matrix). The same protocol on a randomly initialised encoder is the baseline.
  (We chose L-BFGS over SGD: deterministic, no learning rate to tune, seconds on a CPU.)
- **Fine-tuning** (:func:`finetune`): the whole network (encoder, the first ``head_layers``
  projection-head blocks, a new linear classifier) is trained on a label subset with crop +
  flip only, SGD with Nesterov momentum 0.9 and a cosine schedule; the same recipe from a
  random initialisation is the baseline.
- **Transfer** (:func:`transfer`): both of the above on another prepared dataset.

Accuracies are fractions in [0, 1].

The package: :mod:`~simclr_core.evaluate.common` (the models and what the evaluations share),
:mod:`~simclr_core.evaluate.linear`, :mod:`~simclr_core.evaluate.semi_supervised` (fine-tuning) and
:mod:`~simclr_core.evaluate.transfer_learning`, one module a stage (not named ``finetune`` and
``transfer``: the package exports those functions, which would hide modules of the same names). Feature extraction and the kNN
classifier stay at the library's base (:mod:`simclr_core.features`, :mod:`simclr_core.knn`):
pretraining's kNN monitor uses them too, and it should not depend on the evaluation stages.
"""

from simclr_core.evaluate.common import labelled, load_pretrained, random_init_model, topk_accuracy
from simclr_core.evaluate.semi_supervised import Classifier, finetune, finetune_pair, score_classifier, train_classifier
from simclr_core.evaluate.linear import LogisticRegression, fit_logistic_regression, linear_eval, linear_protocol
from simclr_core.evaluate.transfer_learning import transfer

__all__ = [
    "load_pretrained", "random_init_model", "topk_accuracy", "labelled", "LogisticRegression", "fit_logistic_regression",
    "linear_protocol", "linear_eval", "Classifier", "train_classifier", "score_classifier", "finetune_pair", "finetune",
    "transfer",
]
