package e2e

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestImages checks the container images the real-cluster e2e imports into containerd, as
// built by scripts/images.sh (buildah, unchanged Dockerfiles, no Docker, no pulls): their
// tags, configs and files, read straight from the docker-archive tarballs.
// scripts/test.sh builds them once and passes the directory in EGRESS_GUARD_IMAGES.
func TestImages(t *testing.T) {
	dir := imagesDir(t)

	// The two Go images: one static binary each on a distroless-like base, as 15337:15337 (the
	// UID the capture rules exempt, and the chart's pod securityContext), each without the
	// other's binary. Every node pulls the proxy's for the injected sidecar; the control
	// plane links client-go and has its own.
	for _, tc := range []struct {
		name, tar, ref, bin, absent string
		limit                       int64 // uncompressed bytes
	}{
		// Measured 12.1 MiB (the proxy, about 12 MB, and the base's few hundred KB); 40.2 MiB
		// while it also carried the controller.
		{"sidecar", "egress-guard.tar", "localhost/egress-guard:dev", "egress-guard", "egress-guard-controller", 14 << 20},
		// Measured 28.4 MiB.
		{"controller", "egress-guard-controller.tar", "localhost/egress-guard-controller:dev", "egress-guard-controller", "egress-guard", 32 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := loadImage(t, filepath.Join(dir, tc.tar), tc.ref)
			img.wantPlatform(t)
			if got := img.Config.Config.User; got != "15337:15337" {
				t.Errorf("User = %q, want 15337:15337", got)
			}
			img.wantEntrypoint(t, "/usr/local/bin/"+tc.bin)
			img.wantExecutable(t, "usr/local/bin/"+tc.bin)
			if _, ok := img.resolve("usr/local/bin/" + tc.absent); ok {
				t.Errorf("the %s image has usr/local/bin/%s, which belongs in the other image", tc.name, tc.absent)
			}
			img.wantDistroless(t)
			t.Logf("%s image: %d bytes uncompressed (%.1f MiB) in %d layer(s), files %.1f MiB",
				tc.name, img.LayerBytes, mib(img.LayerBytes), len(img.Layers), mib(img.FileBytes))
			if img.LayerBytes >= tc.limit {
				t.Errorf("%s image is %.1f MiB uncompressed, want < %.0f MiB", tc.name, mib(img.LayerBytes), mib(tc.limit))
			}
		})
	}

	t.Run("init", func(t *testing.T) {
		img := loadImage(t, filepath.Join(dir, "egress-guard-init.tar"), "localhost/egress-guard-init:dev")
		img.wantPlatform(t)
		img.wantEntrypoint(t, "/usr/local/bin/egress-guard-init")
		img.wantExecutable(t, "usr/local/bin/egress-guard-init")
		// Debian's iptables package: one multi-call binary per variant...
		img.wantExecutable(t, "usr/sbin/xtables-nft-multi")
		img.wantExecutable(t, "usr/sbin/xtables-legacy-multi")
		// ...and the commands egress-guard-init runs (init-container/capture), which must
		// lead to the right one.
		for _, v := range []string{"nft", "legacy"} {
			for _, fam := range []string{"iptables", "ip6tables"} {
				for _, suffix := range []string{"", "-save", "-restore"} {
					img.wantLink(t, "usr/sbin/"+fam+"-"+v+suffix, "usr/sbin/xtables-"+v+"-multi")
				}
			}
		}
		// Plain iptables (through /etc/alternatives) picks the default variant: nft on bookworm.
		img.wantLink(t, "usr/sbin/iptables", "usr/sbin/xtables-nft-multi")
		t.Logf("init image: %d bytes uncompressed (%.1f MiB) in %d layer(s)",
			img.LayerBytes, mib(img.LayerBytes), len(img.Layers))
	})

	t.Run("pause", func(t *testing.T) {
		img := loadImage(t, filepath.Join(dir, "pause.tar"), "localhost/egress-guard-e2e/pause:1")
		img.wantPlatform(t)
		img.wantEntrypoint(t, "/pause")
		img.wantExecutable(t, "pause")
		t.Logf("pause image: %.1f MiB", mib(img.LayerBytes))
	})

	t.Run("curl", func(t *testing.T) {
		img := loadImage(t, filepath.Join(dir, "curl.tar"), "localhost/egress-guard-e2e/curl:1")
		img.wantPlatform(t)
		img.wantExecutable(t, "usr/bin/curl")
		img.wantExecutable(t, "usr/bin/sleep")
		t.Logf("curl image: %.1f MiB", mib(img.LayerBytes))
	})
}

// imagesDir returns the directory holding the image tarballs: $EGRESS_GUARD_IMAGES, or
// what scripts/images.sh prints after building them (cold: several minutes).
func imagesDir(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("EGRESS_GUARD_IMAGES"); d != "" {
		return d
	}
	var reason string
	if os.Geteuid() != 0 {
		reason = fmt.Sprintf("building the images needs root (buildah; running as uid %d); or set EGRESS_GUARD_IMAGES to a directory scripts/images.sh made", os.Geteuid())
	} else if _, err := exec.LookPath("buildah"); err != nil {
		reason = "building the images needs buildah on PATH (scripts/deps.sh installs it)"
	}
	if reason != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("images e2e cannot run: %s (CI must run the e2e tests)", reason)
		}
		t.Skipf("images e2e skipped: %s", reason)
	}
	timeout := 30 * time.Minute
	if d, ok := t.Deadline(); ok {
		timeout = time.Until(d) - 30*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	root, _ := filepath.Abs("..")
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "images.sh"))
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("scripts/images.sh (%s):\n%s", time.Since(start).Round(time.Second), stderr.String())
	if err != nil {
		t.Fatalf("scripts/images.sh: %v", err)
	}
	d := strings.TrimSpace(stdout.String())
	if d == "" {
		t.Fatal("scripts/images.sh printed no directory")
	}
	return d
}

// image is a docker-archive image: its manifest entry, config and merged filesystem.
type image struct {
	Tags   []string
	Layers []string
	Config struct {
		Architecture string `json:"architecture"`
		OS           string `json:"os"`
		Config       struct {
			User       string   `json:"User"`
			Entrypoint []string `json:"Entrypoint"`
			Cmd        []string `json:"Cmd"`
		} `json:"config"`
	}
	Files      map[string]*tar.Header // the merged filesystem (whiteouts applied), by clean path
	Contents   map[string][]byte      // the contents of a few small files (see smallFiles)
	LayerBytes int64                  // the uncompressed layer tars
	FileBytes  int64                  // the regular files of the merged filesystem
}

// smallFiles are the files whose contents loadImage keeps (last layer wins).
var smallFiles = []string{"etc/passwd", "etc/group"}

// loadImage reads a docker-archive tarball (as `buildah push docker-archive:` and
// `docker save` write it) in one pass, and checks it is tagged tag.
func loadImage(t *testing.T, file, tag string) *image {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatalf("image %s: %v", tag, err)
	}
	defer f.Close()
	type layer struct {
		files    map[string]*tar.Header
		whiteout []string // paths removed from the layers below
		opaque   []string // directories whose lower contents are hidden
		contents map[string][]byte
		size     int64
	}
	layers := map[string]*layer{}
	jsons := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("image %s: reading %s: %v", tag, file, err)
		}
		name := path.Clean(h.Name)
		if h.Typeflag != tar.TypeReg {
			continue
		}
		br := bufio.NewReaderSize(tr, 4096)
		head, _ := br.Peek(512)
		gz := bytes.HasPrefix(head, []byte{0x1f, 0x8b})
		isTar := len(head) == 512 && (bytes.Equal(head[257:262], []byte("ustar")) || bytes.Count(head, []byte{0}) == 512)
		if !gz && !isTar { // manifest.json, the config, repositories...
			b, err := io.ReadAll(io.LimitReader(br, 16<<20))
			if err != nil {
				t.Fatalf("image %s: %s: %v", tag, name, err)
			}
			jsons[name] = b
			continue
		}
		// A layer: a tar, possibly gzipped.
		l := &layer{files: map[string]*tar.Header{}, contents: map[string][]byte{}}
		cr := &countingReader{r: br}
		var r io.Reader = cr
		if gz {
			zr, err := gzip.NewReader(br)
			if err != nil {
				t.Fatalf("image %s: layer %s: %v", tag, name, err)
			}
			cr.r = zr
		}
		lr := tar.NewReader(r)
		for {
			lh, err := lr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("image %s: layer %s: %v", tag, name, err)
			}
			p := strings.TrimPrefix(path.Clean("/"+lh.Name), "/")
			dir, base := path.Split(p)
			dir = strings.TrimSuffix(dir, "/")
			switch {
			case base == ".wh..wh..opq":
				l.opaque = append(l.opaque, dir)
			case strings.HasPrefix(base, ".wh."):
				l.whiteout = append(l.whiteout, path.Join(dir, strings.TrimPrefix(base, ".wh.")))
			case p == "":
			default:
				l.files[p] = lh
				if slices.Contains(smallFiles, p) && lh.Typeflag == tar.TypeReg {
					b, err := io.ReadAll(io.LimitReader(lr, 1<<20))
					if err != nil {
						t.Fatalf("image %s: layer %s: %s: %v", tag, name, p, err)
					}
					l.contents[p] = b
				}
			}
		}
		io.Copy(io.Discard, cr) // the end-of-archive padding counts too
		l.size = cr.n
		layers[name] = l
	}
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(jsons["manifest.json"], &manifest); err != nil {
		t.Fatalf("image %s: manifest.json: %v", tag, err)
	}
	if len(manifest) != 1 {
		t.Fatalf("image %s: manifest.json has %d images, want 1", tag, len(manifest))
	}
	m := manifest[0]
	img := &image{Tags: m.RepoTags, Layers: m.Layers, Files: map[string]*tar.Header{}, Contents: map[string][]byte{}}
	if !slices.Contains(m.RepoTags, tag) {
		t.Fatalf("%s is tagged %q, want %q", file, m.RepoTags, tag)
	}
	if err := json.Unmarshal(jsons[path.Clean(m.Config)], &img.Config); err != nil {
		t.Fatalf("image %s: config %s: %v", tag, m.Config, err)
	}
	under := func(p, dir string) bool { return dir == "" || p == dir || strings.HasPrefix(p, dir+"/") }
	for _, name := range m.Layers {
		l := layers[path.Clean(name)]
		if l == nil {
			t.Fatalf("image %s: layer %s is in the manifest but not in the archive", tag, name)
		}
		img.LayerBytes += l.size
		for p := range img.Files {
			for _, d := range l.opaque {
				if p != d && under(p, d) {
					delete(img.Files, p)
					delete(img.Contents, p)
				}
			}
			for _, w := range l.whiteout {
				if under(p, w) {
					delete(img.Files, p)
					delete(img.Contents, p)
				}
			}
		}
		for p, h := range l.files {
			img.Files[p] = h
		}
		for p, b := range l.contents {
			img.Contents[p] = b
		}
	}
	for _, h := range img.Files {
		if h.Typeflag == tar.TypeReg {
			img.FileBytes += h.Size
		}
	}
	return img
}

// resolve follows symbolic links (absolute or relative, at any component) inside the
// image and returns the final path, if it exists.
func (img *image) resolve(p string) (string, bool) {
	parts := strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/")
	cur := ""
	for hops := 0; len(parts) > 0; {
		next := path.Join(cur, parts[0])
		parts = parts[1:]
		h, ok := img.Files[next]
		if !ok {
			return next, false
		}
		if h.Typeflag == tar.TypeSymlink {
			if hops++; hops > 40 {
				return next, false
			}
			target := h.Linkname
			if !path.IsAbs(target) {
				target = path.Join("/", cur, target)
			}
			parts = append(strings.Split(strings.TrimPrefix(path.Clean(target), "/"), "/"), parts...)
			cur = ""
			continue
		}
		if h.Typeflag == tar.TypeLink { // hard link: the target path holds the data
			next = strings.TrimPrefix(path.Clean("/"+h.Linkname), "/")
		}
		cur = next
	}
	return cur, true
}

func (img *image) wantPlatform(t *testing.T) {
	t.Helper()
	if img.Config.OS != "linux" || img.Config.Architecture != runtime.GOARCH {
		t.Errorf("%v: platform %s/%s, want linux/%s (ctr import filters other platforms out)",
			img.Tags, img.Config.OS, img.Config.Architecture, runtime.GOARCH)
	}
}

// wantDistroless checks the distroless-like base: a CA bundle, no shell.
func (img *image) wantDistroless(t *testing.T) {
	t.Helper()
	img.wantRegular(t, "etc/ssl/certs/ca-certificates.crt")
	if _, ok := img.resolve("bin/sh"); ok {
		t.Errorf("%v has a shell (bin/sh): the base should be distroless", img.Tags)
	}
}

func (img *image) wantEntrypoint(t *testing.T, ep ...string) {
	t.Helper()
	if !slices.Equal(img.Config.Config.Entrypoint, ep) {
		t.Errorf("%v: Entrypoint = %q, want %q", img.Tags, img.Config.Config.Entrypoint, ep)
	}
}

// wantRegular checks that p (after symlinks) is a non-empty regular file and returns it.
func (img *image) wantRegular(t *testing.T, p string) *tar.Header {
	t.Helper()
	r, ok := img.resolve(p)
	if !ok {
		t.Errorf("%v: %s does not exist", img.Tags, p)
		return nil
	}
	h := img.Files[r]
	if h.Typeflag != tar.TypeReg || h.Size == 0 {
		t.Errorf("%v: %s (%s) is not a non-empty regular file (type %q, %d bytes)", img.Tags, p, r, h.Typeflag, h.Size)
		return nil
	}
	return h
}

func (img *image) wantExecutable(t *testing.T, p string) {
	t.Helper()
	if h := img.wantRegular(t, p); h != nil && h.Mode&0o111 != 0o111 {
		t.Errorf("%v: %s has mode %#o, want executable by all", img.Tags, p, h.Mode&0o7777)
	}
}

// wantLink checks that p exists and resolves (through symlinks) to target.
func (img *image) wantLink(t *testing.T, p, target string) {
	t.Helper()
	r, ok := img.resolve(p)
	switch {
	case !ok:
		t.Errorf("%v: %s does not exist (or dangles at %s)", img.Tags, p, r)
	case r != target:
		t.Errorf("%v: %s leads to %s, want %s", img.Tags, p, r, target)
	}
}

// countingReader counts the bytes read through it (a layer's uncompressed size).
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
