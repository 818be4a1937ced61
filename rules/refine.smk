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
