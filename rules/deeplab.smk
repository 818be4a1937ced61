# Stage 6: DeepLab trained on the pseudo-masks (or on ground truth: the upper bound), predicted in
# shards and evaluated. Stage 7: the summary table over experiments.


scattergather:
    deeplab=CFG["deeplab"]["shards"],


rule seed_masks_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        sweep=f"{RESULTS}/{{experiment}}/seeds/threshold_sweep.csv",
    output:
        marker=f"{RESULTS}/{{experiment}}/seeds/masks/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("seed_masks"),
    log:
        f"{LOGS}/{{experiment}}/seed_masks_shard-{{scatteritem}}.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/seed_masks_shard.py"


rule train_deeplab:
    input:
        # the images and (deeplab.pseudo_masks: gt) the ground truth: a run trained on ground truth
        # has no pseudo-mask input that would wait for the dataset
        ready=dataset_ready(),
        masks=deeplab_mask_markers,
        confidence=deeplab_confidence_markers,
        pretrained=pretrained_weights("deeplab"),
    output:
        model=f"{RESULTS}/{{experiment}}/deeplab/model.pt",
        log_csv=report(
            f"{RESULTS}/{{experiment}}/deeplab/train_log.csv",
            category="Training",
            subcategory="{experiment}",
            caption="../report/train_log.rst",
        ),
    params:
        cfg=stage_params("deeplab_train"),
        work_dir=f"{RESULTS}/{{experiment}}/deeplab/work",
    log:
        f"{LOGS}/{{experiment}}/train_deeplab.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/train_deeplab.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(16000),
        runtime=res.runtime(720),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/train_deeplab.py"


rule deeplab_predict_shard:
    input:
        model=f"{RESULTS}/{{experiment}}/deeplab/model.pt",
    output:
        marker=f"{RESULTS}/{{experiment}}/deeplab/predictions/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("deeplab_predict"),
    log:
        f"{LOGS}/{{experiment}}/deeplab_predict_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/deeplab_predict_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(8000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/deeplab_predict_shard.py"


rule eval_deeplab:
    input:
        markers=gather.deeplab(f"{RESULTS}/{{{{experiment}}}}/deeplab/predictions/shard-{{scatteritem}}.json"),
    output:
        metrics=report(
            f"{RESULTS}/{{experiment}}/deeplab/metrics.csv",
            category="DeepLab",
            subcategory="{experiment}",
            caption="../report/deeplab_metrics.rst",
        ),
        per_class=f"{RESULTS}/{{experiment}}/deeplab/per_class.csv",
        gallery=report(
            f"{RESULTS}/{{experiment}}/deeplab/gallery.png",
            category="DeepLab",
            subcategory="{experiment}",
            caption="../report/deeplab_gallery.rst",
        ),
    params:
        cfg=stage_params("deeplab_eval"),
    log:
        f"{LOGS}/{{experiment}}/eval_deeplab.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/eval_deeplab.py"


rule summary_table:
    input:
        stage_outputs=summary_inputs(),
    output:
        csv=report(f"{RESULTS}/tables/summary.csv", category="Tables", caption="../report/summary.rst"),
        md=f"{RESULTS}/tables/summary.md",
        ablation=report(f"{RESULTS}/tables/ablation.csv", category="Tables", caption="../report/ablation.rst"),
        ablation_md=f"{RESULTS}/tables/ablation.md",
    params:
        experiments=EXPERIMENTS,
        # results/<tag>: two levels above tables/summary.csv
        results=lambda w, output: os.path.dirname(os.path.dirname(output.csv)),
        fully_supervised=fully_supervised_experiment(CFG),
    log:
        f"{LOGS}/summary_table.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(1000),
        runtime=res.runtime(10),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/summary_table.py"
