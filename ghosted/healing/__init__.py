"""Healing a pruned checkpoint: knowledge distillation from its dense base on training text (`ghosted heal`).

    data.py   the healing windows (training splits only), their held-out split, the check against evaluation text
    lora.py   hand-rolled LoRA adapters: hooked while training, merged into the weights at the end
    train.py  what trains (HealPlan) and the training (ghosted.solve.distill.kd_train)
    run.py    the command: lineage and base check, teacher, training, guard, the checkpoint written

The recipe is the `heal:` section of params.yaml (ghosted.config.heal.HealConfig); docs/healing.md has the
measurements.
"""
