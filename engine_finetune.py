"""Fine-tuning / linear-probing epochs and evaluation."""
import paddle
import paddle.nn.functional as F

import util.lr_sched as lr_sched
import util.misc as misc
from util import nonfinite
from util.amp import autocast
from util.dist import get_rank, grad_sync
from util.epochs import epoch_meters, log_step, read_step, train_epochs
from util.run_state import load_weights


def train_one_epoch(model, criterion, data_loader, optimizer, epoch, loss_scaler, max_norm=None, mixup_fn=None,
                    log_writer=None, args=None, start_iter=0, left_out=(), metric_logger=None, erasing=None):
    """One pass over data_loader (from batch start_iter when resuming inside the epoch, continuing its meters;
    passing over the iterations in left_out, which rewinds left out); returns (the meters, for
    util.epochs.end_epoch; the iteration a stop signal ended the epoch after, or None). Every step's random draws
    (erasing values, mixup, drop path) are seeded from (seed, rank, epoch, step), so that a resumed run draws what
    the uninterrupted one did. The step reads one number from the device: the loss (util.epochs.read_step)."""
    model.train()
    metric_logger, header = epoch_meters(epoch, metric_logger)
    optimizer.clear_grad()
    accum_iter = args.accum_iter

    batches = metric_logger.log_every(data_loader, args.print_freq, header, start=start_iter)
    for data_iter_step, (samples, *boxes, targets) in enumerate(batches, start=start_iter):
        if data_iter_step in left_out:  # left out by a rewind (--on_nonfinite rewind)
            continue
        misc.seed_everything(args.seed + get_rank(), epoch, data_iter_step)
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
        if erasing is not None:
            samples = erasing.fill(samples, boxes[0])
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        with grad_sync(model, update):
            with autocast(args):
                outputs = model(samples)
                loss = criterion(outputs.astype("float32"), targets)
            found_inf = loss_scaler.backward(loss / accum_iter, optimizer, clip_grad=max_norm,
                                             parameters=model.parameters(), update_grad=update)
            loss_value, stop, skip = read_step(nonfinite.through_hooks(loss, epoch, data_iter_step), update,
                                               every_step=args.on_nonfinite == "rewind", found_inf=found_inf)
            nonfinite.check_loss(loss_value, epoch, data_iter_step)
            if update:
                loss_scaler.step(optimizer, skip)
        if update:
            optimizer.clear_grad()

        if log_step(metric_logger, log_writer, loss_value, max(lr_sched.group_lrs(optimizer)), data_iter_step,
                    len(data_loader), epoch, update, stop):
            return metric_logger, data_iter_step + 1
    return metric_logger, None


def correct_counts(output, target, topk=(1,)):
    """How many samples have their target among the top k outputs, for each k (capped at the number of
    classes), as one device tensor [len(topk)]."""
    maxk = min(max(topk), output.shape[1])
    pred = paddle.topk(output, maxk, axis=1)[1]
    correct = (pred == target.reshape([-1, 1])).astype("float32")
    return paddle.stack([correct[:, :min(k, maxk)].sum() for k in topk])


@paddle.no_grad()
def evaluate(data_loader, model, args):
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = "Test:"
    model.eval()
    for images, target in metric_logger.log_every(data_loader, 10, header):
        with autocast(args):
            output = model(images)
        output = output.astype("float32")
        loss = F.cross_entropy(output, target)
        loss, top1, top5 = paddle.concat([loss.reshape([1]), correct_counts(output, target, (1, 5))]).tolist()
        batch_size = images.shape[0]
        acc1, acc5 = top1 * 100.0 / batch_size, top5 * 100.0 / batch_size
        metric_logger.update(loss=loss)  # the batch's one read of the device
        metric_logger.meters["acc1"].update(acc1, n=batch_size)
        metric_logger.meters["acc5"].update(acc5, n=batch_size)
    metric_logger.synchronize_between_processes()
    print(f"* Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f} "
          f"loss {metric_logger.loss.global_avg:.3f}")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def fit(args, model, model_without_ddp, optimizer, loss_scaler, criterion, loaders, mixup_fn=None, max_norm=None,
        erasing=None):
    """--eval: evaluate the --resume checkpoint. Otherwise train the remaining epochs, evaluating after each."""
    data_loader_train, data_loader_val = loaders

    def evaluate_and_report():
        test_stats = evaluate(data_loader_val, model, args)
        print(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    if args.eval:
        load_weights(args, model_without_ddp, data_loader_val.dataset.classes, data_loader_val.dataset.root)
        evaluate_and_report()
        return

    def train_epoch(epoch, start_iter, left_out, log_writer, metric_logger):
        return train_one_epoch(model, criterion, data_loader_train, optimizer, epoch, loss_scaler, max_norm, mixup_fn,
                               log_writer=log_writer, args=args, start_iter=start_iter, left_out=left_out,
                               metric_logger=metric_logger, erasing=erasing)

    train_epochs(args, model_without_ddp, optimizer, loss_scaler, data_loader_train, train_epoch, evaluate_and_report,
                 classes=data_loader_train.dataset.classes)
