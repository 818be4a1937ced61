# Stage 0 (optional): formula-driven pretraining, the weights behind `pretrained: procedural`.
# One model per backbone network, independent of the dataset; made once and reused by every
# dataset, experiment and stage that asks for it (wsss/pretrain/, docs/pretrain.md).


rule pretrain:
    output:
        model="results/pretrain/{arch}/model.pt",
        log_csv=report(
            "results/pretrain/{arch}/train_log.csv",
            category="Training",
            subcategory="pretrain",
            caption="../report/train_log.rst",
        ),
    params:
        cfg=lambda wildcards: {**CFG["pretrain"], "backbone": wildcards.arch},
        work_dir="results/pretrain/{arch}/work",
    log:
        "results/logs/pretrain/{arch}.log",
    benchmark:
        "results/pretrain/{arch}/benchmark.tsv"
    wildcard_constraints:
        arch=r"[A-Za-z0-9]+",
    threads: 4
    resources:
        mem_mb=res.mem_mb(8000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/pretrain.py"
