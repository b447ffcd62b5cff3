# The simulated demo cohort: written as per-sample 10x HDF5 files, then ingested like real data.


if demo_sample_paths():

    rule simulate_demo:
        output:
            samples=demo_sample_paths(),
            truth=f"{config['demo']['dir']}/truth.tsv.gz",
            sheet=f"{config['demo']['dir']}/samples.tsv",
            overlap=f"{config['demo']['dir']}/planted_vs_scored_genes.tsv",
        log:
            f"{LOGS}/simulate_demo.log",
        benchmark:
            f"{BENCH}/simulate_demo.tsv"
        conda:
            "../envs/sepsis_sc.yaml"
        params:
            sheet=demo_sheet(),
            demo=config["demo"],
            organism=config["organism"],
            case=condition_colouring()["case"],
            control=condition_colouring()["control"],
            seed=config["seed"],
        script:
            "../scripts/simulate_demo.py"


if demo_sample_paths() and TESTED_CONTRASTS:

    rule demo_check:
        input:
            effects=f"{RESULTS}/targets/{TESTED_CONTRASTS[0]}/condition_effects.tsv",
            composition=f"{RESULTS}/targets/{TESTED_CONTRASTS[0]}/composition.tsv",
            truth=f"{config['demo']['dir']}/truth.tsv.gz",
        output:
            f"{RESULTS}/targets/demo_check.tsv",
        log:
            f"{LOGS}/demo_check.log",
        conda:
            "../envs/sepsis_sc.yaml"
        params:
            demo=config["demo"],
            stats=config["stats"],
            contrast=first_contrast(),
        script:
            "../scripts/demo_check.py"
