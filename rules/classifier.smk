# Stage 2: image-level classifier training (any registered method), resumable from checkpoints.


rule train_classifier:
    input:
        ready=dataset_ready(),
        labels=f"{RESULTS}/labels.csv",
        init=classifier_inputs,
        pretrained=pretrained_weights("classifier"),
    output:
        model=f"{RESULTS}/{{experiment}}/classifier/model.pt",
        log_csv=report(
            f"{RESULTS}/{{experiment}}/classifier/train_log.csv",
            category="Training",
            subcategory="{experiment}",
            caption="../report/train_log.rst",
        ),
    params:
        cfg=classifier_params,
        work_dir=f"{RESULTS}/{{experiment}}/classifier/work",
    log:
        f"{LOGS}/{{experiment}}/train_classifier.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/train_classifier.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(8000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/train_classifier.py"
