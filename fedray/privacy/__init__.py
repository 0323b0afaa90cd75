"""Client-level differential privacy: the mechanisms (:mod:`fedray.privacy.mechanism`) and the
privacy loss of a run from a library accountant (:mod:`fedray.privacy.accountant`)."""
