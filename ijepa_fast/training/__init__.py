"""Training: the step (optimiser, ``train_step``), the one assembler of the run's step
(``Engine``), the trainer behind ``ijepa-fast train``, schedules, the run folder, the collapse
monitor and multi-process set-up.
"""
