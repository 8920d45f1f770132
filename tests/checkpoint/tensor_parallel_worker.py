"""Run by ``test_tensor_parallel`` under ``torch.distributed.run`` (gloo, CPU): each rank loads the
checkpoints of a job file with ``from_pretrained(dir, tp_plan=...)`` and writes what the test
checks: its logits (eager, and compiled with ``glowq_backend`` where asked), the local shapes of the
split tensors, the warnings, or the error."""

import json
import sys
import warnings

import torch
import torch.distributed as dist
import transformers as T

import glowq_fx  # noqa: F401  (registers the glowq quantization method)
from glowq_fx import GlowQConfig, glowq_backend
from glowq_fx.errors import GlowQWarning


def run(job: dict, rank: int) -> dict:
    world = dist.get_world_size()
    kwargs = ({"tp_plan": "auto"} if job["how"] == "tp_plan" else
              {"distributed_config": T.DistributedConfig(tp_size=world, ep_size=world, enable_expert_parallel=True)}
              if job["how"] == "expert_parallel" else {"distributed_config": T.DistributedConfig(tp_size=world)})
    if job.get("quantize_on_load"):
        kwargs["quantization_config"] = GlowQConfig(dataset=["calibration text"], tokenizer=job["dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = T.AutoModelForCausalLM.from_pretrained(job["dir"], **kwargs)
        except Exception as e:  # the test asserts which error, by its message
            return {"error": f"{type(e).__name__}: {e}"}
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        compiled = torch.compile(model, backend=glowq_backend)(input_ids=ids).logits if job.get("compile") else None
        generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False) if job.get("compile") else None
    local = {k: tuple((v.to_local() if hasattr(v, "to_local") else v).shape)
             for k, v in [*model.named_parameters(), *model.named_buffers()]}
    if job.get("resave"):
        model.save_pretrained(job["resave"])  # every rank: the shards are gathered collectively
    save_error = None
    if job.get("save_refused"):
        try:
            model.save_pretrained(job["save_refused"])
        except Exception as e:  # the test asserts which error, by its message
            save_error = f"{type(e).__name__}: {e}"
    return {"logits": logits, "save_error": save_error, "compiled": compiled, "generated": generated,
            "local_shapes": local, "rank": rank,
            "warnings": [str(w.message) for w in caught if isinstance(w.message, GlowQWarning)]}


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for job in jobs:
        torch.save(run(job, rank), f"{job['out']}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
