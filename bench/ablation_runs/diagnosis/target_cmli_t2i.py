"""Diagnosis: target_cmli with eq. 10's i2t regression off (cmli.target_directions="t2i"): only the
captioning pass's caption states regress their matched patches."""

from configs import target_cmli


def get_config(arg=None):
  config = target_cmli.get_config(arg)
  config.name = "target_cmli_t2i"
  config.cmli.target_directions = "t2i"
  return config
