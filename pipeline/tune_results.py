"""What a search leaves behind: metrics/tune.json (best params and value, every trial),
Optuna's history and importance plots as PNGs, and the same in the study's MLflow parent run."""
from __future__ import annotations

from typing import Any

from pipeline import tracking

from pipeline.core import paths
from pipeline.core.io import write_json
from pipeline.training.trial import experiment_name


def finished(study) -> list:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [t for t in study.trials if t.state in done]


def trial_user_attrs(study, number: int) -> dict:
    return study.trials[number].user_attrs  # re-read from the storage: the train stage writes them


def results(study, objective: str, direction: str) -> dict[str, Any]:
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    return {"study": study.study_name, "objective": objective, "direction": direction,
            "best_value": best.value if best else None, "best_params": best.params if best else {},
            "best_trial": best.number if best else None,
            "best_experiment": experiment_name(study.study_name, best.number) if best else None,
            "trials": [{"number": t.number, "experiment": experiment_name(study.study_name, t.number),
                        "params": t.params, "value": t.value, "state": t.state.name} for t in study.trials
                       if t.state.is_finished()]}


def plots(study) -> None:
    """Optuna's optimisation history and parameter importances (or a note why there are none)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    from pipeline.plots import note_figure, plt, save

    complete = any(t.state.name == "COMPLETE" for t in study.trials)
    for path, draw in ((paths.TUNE_HISTORY_PNG, ovm.plot_optimization_history),
                       (paths.TUNE_IMPORTANCE_PNG, ovm.plot_param_importances)):
        if not complete:
            note_figure(f"{path.stem}: no trial has finished yet", path)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # "the interface can change": we pin optuna
                warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" with a few trials
                ax = draw(study)
            save(ax.figure, path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few finished trials, one value
            plt.close("all")
            note_figure(f"{path.stem}: not enough finished trials yet ({exc})", path)


def report(study, objective: str, direction: str, mlflow) -> dict[str, Any]:
    out = results(study, objective, direction)
    write_json(paths.TUNE_RESULTS, out)
    plots(study)
    if out["best_value"] is not None:
        tracking.log_metrics(mlflow, {f"tune/best_{objective}": out["best_value"],
                                      "tune/trials": len(out["trials"])})
        tracking.log_params(mlflow, {f"best.{k}": v for k, v in out["best_params"].items()})
    tracking.log_artifacts(mlflow, [paths.TUNE_RESULTS, paths.TUNE_HISTORY_PNG, paths.TUNE_IMPORTANCE_PNG])
    if out["best_value"] is not None:
        print(f"tune: best {objective} {out['best_value']:.4f} in {out['best_experiment']}: "
              + ", ".join(f"{k}={v}" for k, v in out["best_params"].items()) + f" → {paths.TUNE_RESULTS}")
    return out
