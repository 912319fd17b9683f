"""Fitting: the stages (``pose_fit``, ``hand_fit``, ...), the State that flows between them, the
pipeline that runs and checkpoints them (``pipeline``), their confs (``conf``) and the metrics
every stage reports (``metrics``). Submodules are imported explicitly; nothing heavy here."""
