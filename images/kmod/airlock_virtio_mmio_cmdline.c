// SPDX-License-Identifier: GPL-2.0
/*
 * Registers virtio-mmio platform devices from "device=<size>@<base>:<irq>[:<id>]" parameters,
 * like CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, which Debian's packaged kernels leave out.
 */
#include <linux/ioport.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/platform_device.h>
#include <linux/slab.h>

#define MAX_DEVICES 32

static struct platform_device *devices[MAX_DEVICES];
static int count;

static int airlock_mmio_add(const char *val, const struct kernel_param *kp)
{
	struct resource res[2] = {};
	char *str;
	long long base, size;
	unsigned int irq;
	int consumed, processed;
	struct platform_device *pdev;

	if (count >= MAX_DEVICES)
		return -ENOSPC;
	size = memparse(val, &str);
	processed = sscanf(str, "@%lli:%u%n", &base, &irq, &consumed);
	if (size <= 0 || processed < 2 || base < 0 || irq == 0)
		return -EINVAL;
	res[0].flags = IORESOURCE_MEM;
	res[0].start = base;
	res[0].end = base + size - 1;
	res[1].flags = IORESOURCE_IRQ;
	res[1].start = res[1].end = irq;
	pdev = platform_device_register_resndata(NULL, "virtio-mmio", 1000 + count, res,
						 ARRAY_SIZE(res), NULL, 0);
	if (IS_ERR(pdev))
		return PTR_ERR(pdev);
	pr_info("airlock: virtio-mmio device at 0x%llx-0x%llx, irq %u\n",
		(unsigned long long)res[0].start, (unsigned long long)res[0].end, irq);
	devices[count++] = pdev;
	return 0;
}

static const struct kernel_param_ops airlock_mmio_ops = {
	.set = airlock_mmio_add,
};
module_param_cb(device, &airlock_mmio_ops, NULL, 0200);
MODULE_PARM_DESC(device, "virtio-mmio device: <size>@<baseaddr>:<irq>");

static int __init airlock_mmio_init(void)
{
	return 0;
}

static void __exit airlock_mmio_exit(void)
{
	while (count > 0)
		platform_device_unregister(devices[--count]);
}

module_init(airlock_mmio_init);
module_exit(airlock_mmio_exit);
MODULE_DESCRIPTION("Airlock: virtio-mmio devices from the kernel command line");
MODULE_LICENSE("GPL");
