// rpc_probe: single-RPC latency of a CRI endpoint from a Go gRPC client (the client
// kubelet and critest use), for the calls that do next to nothing in the runtime.
//
// It needs google.golang.org/grpc and k8s.io/cri-api, so build it inside a
// cri-tools checkout, which vendors both (see benchmarks/README.md):
//
//	mkdir -p $CRITOOLS/cmd/rpc_probe && cp benchmarks/rpc_probe.go $CRITOOLS/cmd/rpc_probe/main.go
//	cd $CRITOOLS && GOFLAGS=-mod=vendor go build -o /tmp/rpc_probe ./cmd/rpc_probe
//	/tmp/rpc_probe -endpoint unix:///run/pycri/pycri.sock -n 2000 -image busybox
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///run/pycri/pycri.sock", "CRI endpoint")
	n := flag.Int("n", 2000, "calls per RPC (after 200 warm-up calls)")
	image := flag.String("image", "", "image for ImageStatus (skipped when empty)")
	flag.Parse()

	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	img := runtimeapi.NewImageServiceClient(conn)
	calls := []struct {
		name string
		call func(context.Context) error
	}{
		{"Version", func(ctx context.Context) error {
			_, err := rt.Version(ctx, &runtimeapi.VersionRequest{})
			return err
		}},
		{"ListImages", func(ctx context.Context) error {
			_, err := img.ListImages(ctx, &runtimeapi.ListImagesRequest{})
			return err
		}},
		{"ListContainers", func(ctx context.Context) error {
			_, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
			return err
		}},
	}
	if *image != "" {
		calls = append(calls, struct {
			name string
			call func(context.Context) error
		}{"ImageStatus", func(ctx context.Context) error {
			_, err := img.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{
				Image: &runtimeapi.ImageSpec{Image: *image}})
			return err
		}})
	}
	fmt.Printf("%-16s %8s %8s %8s %8s  (us, n=%d)\n", "rpc", "p50", "p90", "p99", "min", *n)
	for _, c := range calls {
		samples := make([]time.Duration, 0, *n)
		for i := 0; i < 200+*n; i++ {
			// a deadline per call, as kubelet and critest set one
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			t0 := time.Now()
			err := c.call(ctx)
			d := time.Since(t0)
			cancel()
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", c.name, err)
				os.Exit(1)
			}
			if i >= 200 {
				samples = append(samples, d)
			}
		}
		sort.Slice(samples, func(a, b int) bool { return samples[a] < samples[b] })
		q := func(p float64) float64 {
			return float64(samples[int(p*float64(len(samples)-1))].Nanoseconds()) / 1000
		}
		fmt.Printf("%-16s %8.1f %8.1f %8.1f %8.1f\n", c.name, q(0.5), q(0.9), q(0.99), q(0))
	}
}
