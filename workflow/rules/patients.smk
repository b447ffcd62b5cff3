# Patient-level immune profiles: every sample's readouts against the control reference range
# (controls scored leave-one-out), immune-state calls with therapy hypotheses, published
# endotype scores, and trajectories of donors sampled more than once (sepsis_sc.patients).


rule patients:
    input:
        unpack(patients_input),
    output:
        profiles=f"{RESULTS}/patients/profiles.tsv",
        states=f"{RESULTS}/patients/states.tsv",
        reference=f"{RESULTS}/patients/reference.tsv",
        endotypes=f"{RESULTS}/patients/endotypes.tsv",
        trajectories=f"{RESULTS}/patients/trajectories.tsv",
    log:
        f"{LOGS}/patients.log",
    benchmark:
        f"{BENCH}/patients.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        mem_mb=cohort_mem("patients"),
        runtime=30,
    params:
        counts_layer=config["qc"]["downstream_layer"],
        patients=config["patients"],
        reference=patient_reference(),
        min_cells=config["stats"]["min_cells"],
        run_name=config["run_name"],
    script:
        "../scripts/patients.py"


rule patient_figures:
    input:
        profiles=f"{RESULTS}/patients/profiles.tsv",
        states=f"{RESULTS}/patients/states.tsv",
        trajectories=f"{RESULTS}/patients/trajectories.tsv",
    output:
        heatmap=report(
            f"{RESULTS}/patients/figures/cohort_heatmap.png",
            caption="../report/patients_heatmap.rst",
            category="9. Patients",
            labels={"title": "Cohort heatmap of patient immune states"},
        ),
        trajectories=report(
            f"{RESULTS}/patients/figures/trajectories.png",
            caption="../report/patients_trajectories.rst",
            category="9. Patients",
            labels={"title": "Trajectories of donors sampled more than once"},
        ),
        cards=report(
            directory(f"{RESULTS}/patients/figures/cards"),
            patterns=["{sample}.png"],
            caption="../report/patients_cards.rst",
            category="9. Patients",
            labels={"title": "Patient immune cards"},
        ),
    log:
        f"{LOGS}/patient_figures.log",
    benchmark:
        f"{BENCH}/patient_figures.tsv"
    conda:
        "../envs/sepsis_sc.yaml"
    resources:
        runtime=30,
    params:
        colouring=condition_colouring(),
    script:
        "../scripts/patient_figures.py"
