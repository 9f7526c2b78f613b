"""Fine-tuning / linear-probing epochs, evaluation, and the epoch loop both scripts share."""
import datetime
import time

import paddle
import paddle.nn.functional as F

import util.lr_sched as lr_sched
import util.misc as misc
from util.dist import broadcast_buffers, get_rank, grad_sync


def train_one_epoch(model, criterion, data_loader, optimizer, epoch, loss_scaler, max_norm=None, mixup_fn=None,
                    log_writer=None, args=None, start_iter=0):
    """One pass over data_loader (from batch start_iter when resuming inside the epoch)."""
    model.train()
    metric_logger, header = misc.train_logger(epoch, optimizer, log_writer, args)
    accum_iter = args.accum_iter

    batches = metric_logger.log_every(data_loader, args.print_freq, header, start=start_iter)
    for data_iter_step, (samples, targets) in enumerate(batches, start=start_iter):
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        with grad_sync(model, update):
            with misc.autocast(args):
                outputs = model(samples)
                loss = criterion(outputs.astype("float32"), targets)
            loss_value = loss.item()
            misc.check_loss(loss_value, epoch, data_iter_step)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        update_grad=update)
        if update:
            optimizer.clear_grad()

        if misc.log_step(metric_logger, log_writer, loss_value, max(lr_sched.group_lrs(optimizer)), data_iter_step,
                         len(data_loader), epoch, update):
            break
    return misc.end_epoch(metric_logger, data_loader, loss_scaler, epoch)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (k capped at the number of classes)."""
    maxk = min(max(topk), output.shape[1])
    pred = paddle.topk(output, maxk, axis=1)[1]
    correct = pred == target.reshape([-1, 1])
    return [correct[:, :min(k, maxk)].astype("float32").sum().item() * 100.0 / output.shape[0] for k in topk]


@paddle.no_grad()
def evaluate(data_loader, model, args):
    metric_logger = misc.MetricLogger(delimiter="  ")
    header = "Test:"
    model.eval()
    for images, target in metric_logger.log_every(data_loader, 10, header):
        with misc.autocast(args):
            output = model(images)
        output = output.astype("float32")
        loss = F.cross_entropy(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        batch_size = images.shape[0]
        metric_logger.update(loss=loss.item())
        metric_logger.meters["acc1"].update(acc1, n=batch_size)
        metric_logger.meters["acc5"].update(acc5, n=batch_size)
    metric_logger.synchronize_between_processes()
    print(f"* Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f} "
          f"loss {metric_logger.loss.global_avg:.3f}")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def fit(args, model, model_without_ddp, optimizer, loss_scaler, criterion, loaders, mixup_fn=None, max_norm=None):
    """--eval, or train from start_epoch: evaluate, save checkpoint-{epoch} and checkpoint-best, log."""
    data_loader_train, data_loader_val = loaders
    n_val = len(data_loader_val.dataset)
    misc.load_model(args, model_without_ddp, optimizer, loss_scaler)
    if args.eval:
        test_stats = evaluate(data_loader_val, model, args)
        print(f"Accuracy of the network on the {n_val} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    log_writer = misc.create_log_writer(args)
    n_parameters = sum(p.numel().item() for p in model_without_ddp.parameters() if not p.stop_gradient)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    max_accuracy = 0.0
    for epoch in range(args.start_epoch, args.epochs):
        misc.seed_everything(args.seed + get_rank(), epoch)
        data_loader_train.batch_sampler.set_epoch(epoch)
        start_iter = args.start_iter if epoch == args.start_epoch else 0
        data_loader_train.skip_batches(start_iter)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, epoch, loss_scaler, max_norm,
                                      mixup_fn, log_writer=log_writer, args=args, start_iter=start_iter)
        broadcast_buffers(model_without_ddp)
        if misc.stopped(args, epoch, model_without_ddp, optimizer, loss_scaler):
            return None
        misc.save_epoch(args, epoch, model_without_ddp, optimizer, loss_scaler)
        test_stats = evaluate(data_loader_val, model, args)
        print(f"Accuracy of the network on the {n_val} test images: {test_stats['acc1']:.1f}%")
        if test_stats["acc1"] > max_accuracy and args.output_dir:
            misc.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, tag="best")
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
            log_writer.flush()
        misc.log_stats(args, {**{f"train_{k}": v for k, v in train_stats.items()},
                              **{f"test_{k}": v for k, v in test_stats.items()},
                              "epoch": epoch, "n_parameters": n_parameters})
        if misc.stop_after_epoch(epoch):
            return test_stats
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return test_stats
