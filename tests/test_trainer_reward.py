"""RewardTrainer: the first batch's loss against TRL's RewardTrainer, margins, training."""

import warnings

import pytest
import torch
from helpers import preference_rows

from fastalign.trainer import RewardConfig, RewardTrainer, byte_tokenizer, tiny_reward_model

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def small_reward_model(scale=10.0):
    model = tiny_reward_model(vocab_size=1000, hidden_size=32, num_layers=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model


@pytest.mark.parametrize("center", [None, 0.01])
def test_first_batch_loss_matches_trl(tmp_path, center):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    data = [dict(row, margin=0.5 * i) for i, row in enumerate(preference_rows(4))]
    model = small_reward_model()
    ours = RewardTrainer(model, byte_tokenizer(),
                         RewardConfig(output_dir=str(tmp_path / "out"), batch_size=4,
                                      center_rewards_coefficient=center or 0.0, progress=False),
                         data)
    our_loss, metrics = ours.compute_loss(ours.collate(ours.train_items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                                report_to=[], use_cpu=True, bf16=False,
                                center_rewards_coefficient=center)
        theirs = trl.RewardTrainer(model=model, args=args, processing_class=byte_tokenizer(),
                                   train_dataset=datasets.Dataset.from_list(data))
        inputs = theirs.data_collator([theirs.train_dataset[i] for i in range(len(data))])
        trl_loss = theirs.compute_loss(theirs.model, inputs).item()
    assert abs(our_loss.item() - trl_loss) <= 1e-4 * abs(trl_loss), (our_loss.item(), trl_loss)
    assert 0 <= metrics["accuracy"] <= 1


def test_training_separates_chosen_from_rejected(tmp_path):
    trainer = RewardTrainer(small_reward_model(scale=1.0), byte_tokenizer(),
                            RewardConfig(output_dir=str(tmp_path / "out"), batch_size=8,
                                         max_steps=15, learning_rate=3e-3, eval_steps=15,
                                         progress=False), preference_rows(32), preference_rows(8))
    last = trainer.train()
    assert last["eval_accuracy"] >= 0.75 and last["eval_loss"] < 0.6, last
    assert (tmp_path / "out" / "metrics.png").is_file()


def test_reward_model_needs_one_output(tmp_path):
    from fastalign.trainer import tiny_llama
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(tiny_llama(vocab_size=1000, hidden_size=32, num_layers=1), byte_tokenizer(),
                      RewardConfig(output_dir=str(tmp_path)), preference_rows(2))
