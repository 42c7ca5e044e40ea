"""Training with Lightning: the LightningModule (``module``: steps and optimisers), the datamodule,
contrastive gradient accumulation (``gradcache``), optimiser groups and schedule (``optim``), fault
tolerance (``callbacks``), what a user sees of a run (``monitor``, ``plots``).

May import everything below it (``model``, ``towers``, ``losses``, ``data``, ``evaluation``, ``runtime``,
``io``, ``config``); never ``commands`` or ``cli``. No Hydra.
"""
