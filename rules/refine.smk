# Stages 4-5: CRF post-processing of CAM seeds and IRN affinity refinement into pseudo-masks.
# Mask-producing jobs are sharded; each shard's tracked output is a JSON marker naming its masks
# folder (masks-<config hash>/ beside it), so an interrupted shard resumes and settings never mix.


scattergather:
    crf=CFG["crf"]["shards"],


rule crf_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
    output:
        marker=f"{RESULTS}/{{experiment}}/crf/shard-{{scatteritem}}.json",
    params:
        cfg=crf_params,
    log:
        f"{LOGS}/{{experiment}}/crf_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/crf_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
    conda:
        "../envs/crf.yaml"
    script:
        "scripts/crf_shard.py"


rule eval_crf:
    input:
        markers=gather.crf(f"{RESULTS}/{{{{experiment}}}}/crf/shard-{{scatteritem}}.json"),
    output:
        metrics=report(
            f"{RESULTS}/{{experiment}}/crf/metrics.csv",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/crf_metrics.rst",
        ),
        per_class=f"{RESULTS}/{{experiment}}/crf/per_class.csv",
    params:
        cfg=crf_params,
        kind="crf",
    log:
        f"{LOGS}/{{experiment}}/eval_crf.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/eval_masks.py"


scattergather:
    irn=CFG["irn"]["shards"],


rule ir_labels_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
    output:
        marker=f"{RESULTS}/{{experiment}}/irn/ir_labels/shard-{{scatteritem}}.json",
    params:
        cfg=irn_params,
    log:
        f"{LOGS}/{{experiment}}/ir_labels_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/ir_labels_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
    conda:
        "../envs/crf.yaml"
    script:
        "scripts/ir_labels_shard.py"


rule train_irn:
    input:
        labels=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/ir_labels/shard-{{scatteritem}}.json"),
        classifier=f"{RESULTS}/{{experiment}}/classifier/model.pt",
    output:
        model=f"{RESULTS}/{{experiment}}/irn/model.pt",
    params:
        cfg=irn_params,
        work_dir=f"{RESULTS}/{{experiment}}/irn/work",
    log:
        f"{LOGS}/{{experiment}}/train_irn.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/train_irn.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(16000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/train_irn.py"


rule irn_masks_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        model=f"{RESULTS}/{{experiment}}/irn/model.pt",
    output:
        marker=f"{RESULTS}/{{experiment}}/irn/masks/shard-{{scatteritem}}.json",
        conf_marker=f"{RESULTS}/{{experiment}}/irn/confidence/shard-{{scatteritem}}.json",
    params:
        cfg=irn_params,
    log:
        f"{LOGS}/{{experiment}}/irn_masks_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/irn_masks_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/irn_masks_shard.py"


rule eval_ir_labels:
    input:
        markers=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/ir_labels/shard-{{scatteritem}}.json"),
    output:
        metrics=report(
            f"{RESULTS}/{{experiment}}/irn/ir_labels/metrics.csv",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/crf_metrics.rst",
        ),
        per_class=f"{RESULTS}/{{experiment}}/irn/ir_labels/per_class.csv",
    params:
        cfg=irn_params,
        kind="ir_labels",
    log:
        f"{LOGS}/{{experiment}}/eval_ir_labels.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/eval_masks.py"


rule eval_irn:
    input:
        markers=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/masks/shard-{{scatteritem}}.json"),
    output:
        metrics=report(
            f"{RESULTS}/{{experiment}}/irn/masks/metrics.csv",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/crf_metrics.rst",
        ),
        per_class=f"{RESULTS}/{{experiment}}/irn/masks/per_class.csv",
    params:
        cfg=irn_params,
        kind="irn",
    log:
        f"{LOGS}/{{experiment}}/eval_irn.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/eval_masks.py"
