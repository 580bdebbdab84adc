"""Thesis tables 7.1-7.6: the all-token bridge 'grouped' (equation and choices in bridgejax/bridges/alltokens.py).

    python train.py --config configs/grouped.py --workdir DIR --config.data.dir=data/cc3m

W_i reads the mean of the vectors the bridge's Linear consumes (retrieval_feature="mean": thesis
6.3's rule, and the reading whose count gives the thesis's 151M for Regions). For a 1-query
attention over all tokens instead:

    python train.py --config configs/grouped.py:retrieval_feature=attention_pool ...
"""

from configs import base


def get_config(arg=None):
  return base.bridge_config("grouped", **base.parse_arg(arg, retrieval_feature="mean", eval="standard"))
