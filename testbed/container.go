package testbed

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// RunOptions describe one `docker run -d`.
type RunOptions struct {
	Name    string            // default: a unique generated name
	Image   string            // default: EchoImage
	Publish []string          // each a -p value, e.g. "127.0.0.1:18080:80", "18081:7/udp"
	Labels  map[string]string // --label
	Env     map[string]string // -e; the echo image gets ECHO_NAME=Name unless set here
	Flags   []string          // more docker run flags, e.g. "--network", "web"
	Args    []string          // after the image
}

// Container is a started container.
type Container struct {
	ID   string
	Name string
	// IP is the container's address on the daemon's bridge, or else on one of its user networks;
	// invalid if it has neither (--network none or host).
	IP netip.Addr
}

// Run starts a container and fails the test if docker refuses. With the echo image (the default)
// it returns once the echo server has bound every port: `docker run -d` returns when the
// container's process has started, and a datagram sent before its UDP socket exists is lost for
// good, which a test would blame on the proxy.
//
// With the default image and no ECHO_NAME in Env, the echo server is told the container's name,
// so every answer through a published port names the container that gave it.
func (d *Daemon) Run(t testing.TB, opts RunOptions) *Container {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	c, err := d.RunErr(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	d.imageMu.Lock()
	isEcho := opts.Image == "" || opts.Image == d.echoTag
	d.imageMu.Unlock()
	if isEcho && len(opts.Args) == 0 && !slices.ContainsFunc(opts.Flags, func(f string) bool { return strings.HasPrefix(f, "--entrypoint") }) {
		if err := d.waitEchoServing(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// Logs returns a container's output, stdout and stderr together (`docker logs` replays the
// container's stderr on its own).
func (d *Daemon) Logs(ctx context.Context, id string) (string, error) {
	cmd := exec.CommandContext(ctx, d.docker, "-H", d.Host, "logs", id)
	cmd.Env = d.cliEnv
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker logs %s: %w", id, err)
	}
	return string(out), nil
}

// WaitEchoServing waits until the echo server in the container started by Start reports that it
// listens on every port (what Run waits for), 15 s at most.
func (d *Daemon) WaitEchoServing(ctx context.Context, id string) error {
	return d.waitEchoServing(ctx, &Container{ID: id, Name: id})
}

// waitEchoServing waits for the echo server's "serving" line, which it logs once every listener
// is bound.
func (d *Daemon) waitEchoServing(ctx context.Context, c *Container) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		out, err := d.Logs(ctx, c.ID)
		if err == nil && strings.Contains(out, " serving http ") {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("echo server in %s did not report serving: %v; its log: %q", c.Name, ctx.Err(), out)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// RunErr is Run returning docker's error (the daemon's message, e.g. "address already in use")
// instead of failing the test. A container whose start failed stays behind in the Created state,
// as with docker itself; teardown removes it.
func (d *Daemon) RunErr(ctx context.Context, opts RunOptions) (*Container, error) {
	id, name, err := d.startContainer(ctx, opts)
	if err != nil {
		return nil, err
	}
	info, err := d.Docker(ctx, "inspect", "-f", "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", id)
	if err != nil {
		return nil, err
	}
	c := &Container{ID: id, Name: name}
	if fields := strings.Fields(info); len(fields) > 0 {
		c.Name = strings.TrimPrefix(fields[0], "/")
		for _, f := range fields[1:] {
			ip, err := netip.ParseAddr(f)
			switch {
			case err != nil:
			case d.Subnet.Contains(ip):
				c.IP = ip
			case d.AddressPool.Contains(ip) && !c.IP.IsValid():
				c.IP = ip
			}
		}
	}
	return c, nil
}

// Start is `docker run -d` and nothing more: it returns the container's ID and name as soon as
// docker does, without inspecting the container or waiting for the echo server, so that a request
// sent next races the application's start as a user's would. Defaults are those of RunErr. On
// error the name is still returned: a container whose start failed stays behind, Created.
func (d *Daemon) Start(ctx context.Context, opts RunOptions) (id, name string, err error) {
	return d.startContainer(ctx, opts)
}

func (d *Daemon) startContainer(ctx context.Context, opts RunOptions) (id, name string, err error) {
	if opts.Image == "" {
		tag, err := d.echoImage(ctx)
		if err != nil {
			return "", "", fmt.Errorf("building the echo image: %w", err)
		}
		opts.Image = tag
	}
	if opts.Name == "" {
		opts.Name = fmt.Sprintf("eds-%d-%d", d.inst.state.Slot, d.nameSeq.Add(1))
	}
	d.imageMu.Lock()
	isEcho := opts.Image == d.echoTag
	d.imageMu.Unlock()
	if _, set := opts.Env["ECHO_NAME"]; isEcho && !set {
		env := maps.Clone(opts.Env)
		if env == nil {
			env = map[string]string{}
		}
		env["ECHO_NAME"] = opts.Name
		opts.Env = env
	}
	out, err := d.Docker(ctx, runArgs(opts)...)
	if err != nil {
		return "", opts.Name, err
	}
	return lastLine(out), opts.Name, nil
}

// runArgs builds the docker run command line, with labels and environment in a stable order so
// that a failing command reads the same in every run.
func runArgs(opts RunOptions) []string {
	args := []string{"run", "-d", "--name", opts.Name}
	for _, p := range opts.Publish {
		args = append(args, "-p", p)
	}
	for _, k := range slices.Sorted(maps.Keys(opts.Labels)) {
		args = append(args, "--label", k+"="+opts.Labels[k])
	}
	for _, k := range slices.Sorted(maps.Keys(opts.Env)) {
		args = append(args, "-e", k+"="+opts.Env[k])
	}
	args = append(args, opts.Flags...)
	args = append(args, opts.Image)
	return append(args, opts.Args...)
}

// lastLine skips warnings some CLI versions print on stdout before the container ID.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// Stop stops a container with a 2 s grace period.
func (d *Daemon) Stop(t testing.TB, c *Container) {
	t.Helper()
	d.MustDocker(t, "stop", "-t", "2", c.ID)
}

// Remove force-removes a container and its anonymous volumes.
func (d *Daemon) Remove(t testing.TB, c *Container) {
	t.Helper()
	d.MustDocker(t, "rm", "-f", "-v", c.ID)
}
