"""The engines that run one optimizer step on a layout, behind one contract (``contract``), one template
(``base``), one optimizer (``outer_optimizer``) and the bad-step guard around it (``step_guard``)."""
