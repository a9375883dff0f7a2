"""Deep supervision on a torchvision ResNet-18, trained for a few seconds on images it makes."""

import argparse

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from deepsup import DeepSupervision, heads


def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with a bright square in one of 4 quadrants; the label is the quadrant."""
    labels, images = torch.randint(0, 4, (n,)), torch.randn(n, 3, 32, 32)
    for image, label in zip(images, labels.tolist()):
        row, col = divmod(label, 2)
        image[:, 16 * row + 4 : 16 * row + 12, 16 * col + 4 : 16 * col + 12] += 1.0
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="training steps (batches of 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # 1: a small model; more threads than free cores slow it
    print(f"{args.steps} steps, {args.threads} thread(s): ~8 s for 30 on a free core; or --steps 5")

    model = torchvision.models.resnet18(num_classes=4)  # any classifier, unmodified
    criterion = nn.CrossEntropyLoss()
    sup = DeepSupervision(
        model,
        taps={"layer2": 0.3, "layer3": 0.4},  # module name -> weight of its aux loss
        head=heads.classification(num_classes=4),  # global average pool + linear, per tap
        criterion=criterion,
    )
    optimizer = torch.optim.Adam(sup.parameters(), lr=1e-3)  # heads included
    sup.train()
    for step in tqdm(range(args.steps), desc="training"):
        images, labels = make_batch(16)
        output, aux = sup(images, target=labels)  # output: exactly what model(images) returns
        main_loss = criterion(output, labels)
        loss = main_loss + sum(aux.values())  # aux: {tap: weight * aux loss}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            raw = "  ".join(f"aux {tap} {value:.3f}" for tap, value in aux.raw.items())
            tqdm.write(f"step {step:3d}  main {main_loss.item():.3f}  {raw}")

    sup.eval()  # now a passthrough: sup(x) is model(x), no head runs
    images, labels = make_batch(256)
    with torch.no_grad():
        predictions = sup(images).argmax(dim=1)
        assert torch.equal(predictions, model(images).argmax(dim=1))  # sup(x) is model(x)
    print(f"accuracy on 256 new images: {(predictions == labels).float().mean().item():.1%}")


if __name__ == "__main__":
    main()
