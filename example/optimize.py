"""A toy experiment: 'train' with a learning rate and report a loss."""

from pydantic import BaseModel

from machinable import Interface


class Optimize(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 100

    def __call__(self) -> None:
        loss = 1 / (1 + self.config.lr * self.config.steps)
        self.save_file("result.json", {"loss": loss})
        self.save_file("log/steps.jsonl", [{"step": s, "lr": self.config.lr} for s in range(3)])

    def loss(self) -> float:
        return self.load_file("result.json")["loss"]
